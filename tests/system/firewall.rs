//! The firewall against the real kernel: what `wardgate firewall render` prints, and the
//! early-boot ruleset, are accepted by nf_tables in a network namespace the test creates
//! (and removes). Needs root and nftables; without them the tests fail and say so.
//!
//! The packet-level tests (devices in namespaces joined by veth pairs) come with the apply
//! layer.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use crate::support::{require, wardgate, Site};

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
