//! The firewall against the real kernel, in network namespaces the tests create and remove:
//! the rendered and early-boot rulesets load; the table nftnl writes lists exactly as the
//! one `nft -f` loads from the rendered text; and real packets between a gateway, two
//! devices and an outside host (joined by veth pairs) meet the policy: registration,
//! segmentation, quarantine and release, the per-address flood limit, and rules that stay
//! when the daemon stops. Needs root, nftables, iproute2, socat and hping3; without them
//! the tests fail and say what to install.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{require, wardgate, Gateway, Site};

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        assert_eq!(
            std::fs::metadata("/proc/self").unwrap().uid(),
            0,
            "the firewall tests need root (network namespaces and nftables); CI runs as root"
        );
        require("ip", "iproute2");
        require("nft", "nftables");
        let name = format!("wgt-{tag}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name} failed");
        Netns(name)
    }

    /// Runs `PROGRAM ARGS` in the namespace.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether a TCP connection from this namespace to `addr` is established within a
    /// second.
    fn connects(&self, addr: &str) -> bool {
        require("socat", "socat");
        let target = format!("TCP:{addr},connect-timeout=1");
        self.run("socat", &["-T1", "-u", "/dev/null", &target])
            .status
            .success()
    }

    /// Runs `nft ARGS` in the namespace with `input` on stdin.
    fn nft(&self, args: &[&str], input: &str) -> (bool, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The ward's configuration with fixed ports and a `[firewall]` section.
fn firewalled_config(site: &Site) -> std::path::PathBuf {
    let text = std::fs::read_to_string(site.write_config())
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:8883\"");
    let text = format!(
        "{text}\n[broker]\nlisten = \"127.0.0.1:1883\"\n\n[firewall]\n\
         device_interfaces = [\"ward0\"]\nmanagement_networks = [\"10.70.0.0/24\", \"fd70::/64\"]\n\
         management_ports = [22]\n\n[[firewall.forward]]\nname = \"pacs\"\n\
         network = \"10.1.2.3\"\nport = 104\n"
    );
    let path = site.path("firewalled.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_rendered_ruleset_is_accepted_by_the_kernel_and_loads() {
    let site = Site::ward();
    let config = firewalled_config(&site);
    let (status, rendered, err) =
        wardgate(&["firewall", "render", "--config", config.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    assert!(rendered.contains("table inet wardgate"), "{rendered}");
    assert!(rendered.contains("elements = { 127.0.0.1 }"), "{rendered}");
    let ns = Netns::new("render");
    let (ok, out) = ns.nft(&["-c", "-f", "-"], &rendered);
    assert!(ok, "nft -c refused the rendered ruleset: {out}\n{rendered}");
    // Loaded for real, the kernel holds our table and nothing else.
    let (ok, out) = ns.nft(&["-f", "-"], &rendered);
    assert!(ok, "{out}");
    let (ok, listed) = ns.nft(&["list", "tables"], "");
    assert!(ok, "{listed}");
    assert_eq!(listed.trim(), "table inet wardgate");
}

#[test]
fn the_early_boot_ruleset_is_accepted_and_can_be_loaded_twice() {
    let early = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/wardgate-early.nft"),
    )
    .unwrap();
    let ns = Netns::new("early");
    for _ in 0..2 {
        let (ok, out) = ns.nft(&["-f", "-"], &early);
        assert!(ok, "{out}");
    }
    let (_, listed) = ns.nft(&["list", "ruleset"], "");
    assert!(listed.contains("iifname \"ward*\""), "{listed}");
}

#[test]
fn a_firewall_without_fixed_ports_is_refused() {
    let site = Site::ward();
    let text = std::fs::read_to_string(site.write_config()).unwrap()
        + "\n[firewall]\ndevice_interfaces = [\"ward0\", \"bad/name\"]\n";
    let path = site.path("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (status, _, err) = wardgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(78), "{err}");
    assert!(err.contains("fixed port"), "{err}");
    assert!(
        err.contains("\"bad/name\" is not an interface name"),
        "{err}"
    );
}

/// A gateway namespace with two device namespaces and an outside host, joined by veth
/// pairs: `ward0` (10.99.1.1) ↔ dev1 (10.99.1.2), `ward1` (10.99.2.1) ↔ dev2 (10.99.2.2),
/// `up0` (10.98.0.1) ↔ out (10.98.0.2). The gateway routes between them.
struct Ward {
    gw: Netns,
    dev1: Netns,
    dev2: Netns,
    out: Netns,
    listeners: Vec<std::process::Child>,
}

impl Ward {
    fn build() -> Ward {
        let (gw, dev1, dev2, out) = (
            Netns::new("gw"),
            Netns::new("d1"),
            Netns::new("d2"),
            Netns::new("out"),
        );
        for ns in [&gw, &dev1, &dev2, &out] {
            ns.ip(&["link", "set", "lo", "up"]);
        }
        for (gw_if, gw_addr, peer, peer_addr) in [
            ("ward0", "10.99.1.1/24", &dev1, "10.99.1.2/24"),
            ("ward1", "10.99.2.1/24", &dev2, "10.99.2.2/24"),
            ("up0", "10.98.0.1/24", &out, "10.98.0.2/24"),
        ] {
            let status = Command::new("ip")
                .args(["link", "add", gw_if, "netns", &gw.0, "type", "veth"])
                .args(["peer", "name", "eth0", "netns", &peer.0])
                .status()
                .unwrap();
            assert!(status.success(), "veth {gw_if}");
            gw.ip(&["addr", "add", gw_addr, "dev", gw_if]);
            gw.ip(&["link", "set", gw_if, "up"]);
            peer.ip(&["addr", "add", peer_addr, "dev", "eth0"]);
            peer.ip(&["link", "set", "eth0", "up"]);
            let via = gw_addr.split('/').next().unwrap();
            peer.ip(&["route", "add", "default", "via", via]);
        }
        let fwd = gw.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        assert!(fwd.status.success());
        let mut ward = Ward {
            gw,
            dev1,
            dev2,
            out,
            listeners: Vec::new(),
        };
        // Something to reach on the outside host and on the second device.
        for ns in [&ward.out.0, &ward.dev2.0] {
            let child = Command::new("ip")
                .args(["netns", "exec", ns, "socat"])
                .args(["TCP-LISTEN:9000,fork,reuseaddr", "SYSTEM:true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            ward.listeners.push(child);
        }
        ward
    }

    /// Waits (with a deadline) until `ns` reaches `addr`.
    fn wait_reachable(ns: &Netns, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.connects(addr) {
            assert!(Instant::now() < deadline, "{} never reached {addr}", ns.0);
        }
    }
}

impl Drop for Ward {
    fn drop(&mut self) {
        for l in &mut self.listeners {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
}

/// Publishes one QoS 1 message as `device` from namespace `ns` to the gateway at `host`.
fn publish_from(ns: &Netns, site: &Site, device: &str, host: &str) -> Output {
    require("mosquitto_pub", "mosquitto-clients");
    let (ca, cert, key) = (site.ca(), site.cert(device), site.key(device));
    let topic = format!("ward/{device}/vitals/hr");
    ns.run(
        "mosquitto_pub",
        &[
            "-h",
            host,
            "-p",
            "8883",
            "-i",
            device,
            "-q",
            "1",
            "-t",
            &topic,
            "-m",
            "72",
            "--cafile",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
}

/// The packet count of the first rule in `chain` whose line contains `marker`.
fn rule_packets(ns: &Netns, chain: &str, marker: &str) -> u64 {
    let (ok, listing) = ns.nft(&["list", "chain", "inet", "wardgate", chain], "");
    assert!(ok, "{listing}");
    let line = listing
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no rule with {marker:?}:\n{listing}"));
    line.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line}"))
}

fn netns_site() -> (Site, std::path::PathBuf) {
    let mut site = Site::ward_with_sans("st-mary", &["10.99.1.1", "10.99.2.1"]);
    site.devices.clear();
    site.register("pump-1", "infusion-pump", "10.99.1.2");
    site.issue("pump-2");
    let text = std::fs::read_to_string(site.write_config())
        .unwrap()
        // The edge's (the first); `[admin] metrics_listen` stays on loopback.
        .replacen("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:8883\"", 1);
    let text = format!(
        "{text}\n[broker]\nlisten = \"127.0.0.1:1883\"\n\n[firewall]\n\
         device_interfaces = [\"ward0\", \"ward1\"]\nnew_connections_per_sec = 5\n\
         new_connections_burst = 10\n"
    );
    let path = site.path("netns.toml");
    std::fs::write(&path, text).unwrap();
    (site, path)
}

#[test]
fn the_table_nftnl_writes_lists_exactly_as_nft_loads_the_rendered_text() {
    let site = Site::ward();
    let config = firewalled_config(&site);
    let (status, rendered, err) =
        wardgate(&["firewall", "render", "--config", config.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    let (by_nftnl, by_nft) = (Netns::new("nftnl"), Netns::new("nft"));
    let out = by_nftnl.run(
        WARDGATE_BIN,
        &["firewall", "apply", "--config", config.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out) = by_nft.nft(&["-f", "-"], &rendered);
    assert!(ok, "{out}");
    let (_, a) = by_nftnl.nft(&["list", "ruleset"], "");
    let (_, b) = by_nft.nft(&["list", "ruleset"], "");
    assert!(a.contains("table inet wardgate"), "{a}");
    assert_eq!(
        a, b,
        "nftnl's table differs from nft's for the same ruleset"
    );
}

const WARDGATE_BIN: &str = crate::support::WARDGATE;

/// `ruleset` (nft syntax) loaded by nft into a namespace of its own, listed back as
/// `nft -s list table inet wardgate` prints it (no counters).
pub(crate) fn listed_by_nft(ruleset: &str, tag: &str) -> String {
    let ns = Netns::new(tag);
    let (ok, out) = ns.nft(&["-f", "-"], ruleset);
    assert!(ok, "nft refused the ruleset: {out}\n{ruleset}");
    let (ok, out) = ns.nft(&["-s", "list", "table", "inet", "wardgate"], "");
    assert!(ok, "{out}");
    out
}

#[tokio::test]
async fn real_packets_meet_the_policy_and_the_rules_outlive_the_daemon() {
    require("hping3", "hping3");
    let (site, config) = netns_site();
    let ward = Ward::build();
    // Before the gateway: the network itself works (so what follows is the firewall).
    Ward::wait_reachable(&ward.dev1, "10.98.0.2:9000");
    Ward::wait_reachable(&ward.dev1, "10.99.2.2:9000");

    let mut gw = Gateway::start_in_netns(&config, &ward.gw.0).await;
    gw.wait_log("firewall.applied", &[]).await;

    // A registered device reaches the edge; an unregistered address does not.
    let out = publish_from(&ward.dev1, &site, "pump-1", "10.99.1.1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused_before = rule_packets(&ward.gw, "from_devices", "anything else");
    assert!(
        !ward.dev2.connects("10.99.2.1:8883"),
        "unregistered address reached the edge"
    );
    // Dropped by the firewall (not lost on the way): its SYNs are counted there.
    let counted = rule_packets(&ward.gw, "from_devices", "anything else");
    assert!(counted > refused_before);
    // The gateway's metrics show the kernel's counters, by rule.
    let metrics = gw.metrics.expect("metrics address");
    let scrape = ward.gw.run(
        "python3",
        &[
            "-c",
            &format!(
                "import urllib.request; print(urllib.request.urlopen('http://{metrics}/metrics').read().decode())"
            ),
        ],
    );
    let text = String::from_utf8_lossy(&scrape.stdout);
    let shown: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"wardgate_firewall_dropped_packets_total{rule="anything else"} "#)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop counter for \"anything else\" in:\n{text}"));
    assert!(shown >= counted, "metrics say {shown}, nft said {counted}");
    // Segmentation: no device-to-device, no device-to-outside.
    assert!(
        !ward.dev1.connects("10.99.2.2:9000"),
        "device reached another device"
    );
    assert!(
        !ward.dev1.connects("10.98.0.2:9000"),
        "device reached the outside host"
    );
    assert!(rule_packets(&ward.gw, "device_forward", "device to device") > 0);

    // Registered through the admin socket: in the set, and through, at once.
    site.admin_ok(&[
        "device",
        "add",
        "pump-2",
        "--class",
        "infusion-pump",
        "--address",
        "10.99.2.2",
    ]);
    let out = publish_from(&ward.dev2, &site, "pump-2", "10.99.2.1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Quarantined: cut at the firewall within a second of the command; released: back.
    let t0 = Instant::now();
    site.admin_ok(&[
        "device",
        "quarantine",
        "pump-1",
        "--reason",
        "firewall test",
    ]);
    let (_, set) = ward
        .gw
        .nft(&["list", "set", "inet", "wardgate", "quarantine_v4"], "");
    let cut_after = t0.elapsed();
    assert!(set.contains("10.99.1.2"), "{set}");
    assert!(
        cut_after < Duration::from_secs(1),
        "quarantine took {cut_after:?}"
    );
    assert!(
        !ward.dev1.connects("10.99.1.1:8883"),
        "quarantined device reached the edge"
    );
    site.admin_ok(&["device", "release", "pump-1"]);
    let out = publish_from(&ward.dev1, &site, "pump-1", "10.99.1.1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A SYN flood from pump-2's address is limited; pump-1 still connects meanwhile.
    let dropped_before = rule_packets(&ward.gw, "from_devices", "limit rate over");
    let flood = ward.dev2.run(
        "hping3",
        &[
            "-q",
            "-S",
            "-p",
            "8883",
            "-i",
            "u2000",
            "-c",
            "600",
            "10.99.2.1",
        ],
    );
    assert!(
        flood.status.success() || flood.status.code() == Some(1),
        "{flood:?}"
    );
    let out = publish_from(&ward.dev1, &site, "pump-1", "10.99.1.1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dropped = rule_packets(&ward.gw, "from_devices", "limit rate over") - dropped_before;
    assert!(
        dropped > 300,
        "only {dropped} of 600 flood SYNs dropped by the meter"
    );

    // The daemon stops; the table stays (fail closed).
    assert!(gw.stop().await.success());
    let (ok, listing) = ward.gw.nft(&["list", "table", "inet", "wardgate"], "");
    assert!(ok && listing.contains("chain from_devices"), "{listing}");
    assert!(
        !ward.dev1.connects("10.98.0.2:9000"),
        "device reached the outside after stop"
    );
    eprintln!(
        "firewall test: quarantine in the kernel {cut_after:?} after the command; \
         {dropped} of 600 flood SYNs (at 500/s) dropped by the 5/s per-address meter"
    );
}
