//! The admin socket and its CLI: registry and quarantine changes that apply at once and
//! survive restarts, counters, JSON output, and the socket's access control.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use rumqttc::{AsyncClient, ConnectReturnCode};

use crate::support::clients::{device_tls, expect_connack_refusal, options, Client};
use crate::support::{require, Gateway, Site, WARDGATE};

async fn refused(site: &Site, gw: &mut Gateway, device: &str, code: &str) {
    let (_c, el) = AsyncClient::new(options(device, gw.port(), device_tls(site, device)), 8);
    expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    let dev = format!("device=\"{device}\"");
    let code = format!("code=\"{code}\"");
    gw.wait_log("edge.connect_refused", &[&dev, &code]).await;
}

#[tokio::test]
async fn device_add_and_remove_apply_live_and_survive_a_restart() {
    let site = Site::ward();
    site.issue("pump-7");
    let config = site.write_config();
    let mut gw = Gateway::start(&config).await;

    let status = site.admin_ok(&["status"]);
    assert!(
        status.contains("3 registered, 0 connected, 0 quarantined"),
        "{status}"
    );
    let s: serde_json::Value = serde_json::from_str(&site.admin_ok(&["status", "--json"])).unwrap();
    assert_eq!(s["gateway"], "gw-test");
    assert_eq!(s["uplink"], "none");

    refused(&site, &mut gw, "pump-7", "unregistered").await;
    assert_eq!(site.device_json("pump-2")["source"], "config");

    // Added: it connects at once, and `device show` counts what it sent.
    site.admin_ok(&[
        "device",
        "add",
        "pump-7",
        "--class",
        "infusion-pump",
        "--address",
        "127.0.0.1",
    ]);
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let mut pump7 = Client::connect(&site, "pump-7", gw.port()).await;
    for i in 0..3 {
        pump7
            .publish(&format!("ward/pump-7/alarm/{i}"), b"occlusion")
            .await;
    }
    assert_eq!(nurse.next_publish().await.topic, "ward/pump-7/alarm/0");
    let shown = site.device_json("pump-7");
    assert_eq!(shown["source"], "admin");
    assert_eq!(shown["class"], "infusion-pump");
    assert_eq!(shown["counters"]["accepted"], 3, "{shown}");
    assert_eq!(shown["connections"].as_array().unwrap().len(), 1, "{shown}");
    let text = site.admin_ok(&["device", "show", "pump-7"]);
    assert!(
        text.contains("accepted") && text.contains("connected"),
        "{text}"
    );

    // Removed: its live session is closed and it is refused from then on.
    let mut pump2 = Client::connect(&site, "pump-2", gw.port()).await;
    site.admin_ok(&["device", "remove", "pump-2"]);
    pump2.closed().await;
    refused(&site, &mut gw, "pump-2", "unregistered").await;
    let (status, _, err) = site.admin(&["device", "remove", "pump-2"]);
    assert!(!status.success());
    assert!(err.contains("not registered"), "{err}");
    let (status, _, err) = site.admin(&[
        "device",
        "add",
        "pump-8",
        "--class",
        "no-such-class",
        "--address",
        "127.0.0.1",
    ]);
    assert!(!status.success());
    assert!(err.contains("no-such-class"), "{err}");

    drop((nurse, pump7));
    assert!(gw.stop().await.success());

    // Both changes survive a restart of the same configuration.
    let mut gw = Gateway::start(&config).await;
    Client::connect(&site, "pump-7", gw.port()).await;
    refused(&site, &mut gw, "pump-2", "unregistered").await;
    let list: serde_json::Value =
        serde_json::from_str(&site.admin_ok(&["device", "list", "--json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["nurse-1", "pump-1", "pump-7"]);
    // The audit log, read from the running gateway.
    let tail = site.admin_ok(&["audit", "tail", "-n", "1000"]);
    assert!(
        tail.contains("device.added") && tail.contains("pump-7"),
        "{tail}"
    );
    let verified = site.admin_ok(&["audit", "verify"]);
    assert!(verified.contains("chain intact"), "{verified}");
    assert!(gw.stop().await.success());

    assert_eq!(site.audit_count("device.added", "pump-7"), 1);
    assert_eq!(site.audit_count("device.removed", "pump-2"), 1);
}

#[tokio::test]
async fn quarantine_by_hand_closes_the_session_and_release_restores_service() {
    let site = Site::ward();
    let config = site.write_config();
    let mut gw = Gateway::start(&config).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    site.admin_ok(&[
        "device",
        "quarantine",
        "pump-1",
        "--reason",
        "pump recalled",
    ]);
    pump.closed().await;
    refused(&site, &mut gw, "pump-1", "quarantined").await;
    let shown = site.device_json("pump-1");
    let reason = shown["quarantine"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("pump recalled") && reason.contains("uid=0"),
        "{reason}"
    );
    assert!(
        shown["counters"]["refused"].as_u64().unwrap() >= 1,
        "{shown}"
    );
    let (status, _, err) = site.admin(&["device", "release", "pump-2"]);
    assert!(
        !status.success() && err.contains("not quarantined"),
        "{err}"
    );

    site.admin_ok(&["device", "release", "pump-1"]);
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/rate", b"5").await;
    assert!(gw.stop().await.success());
    assert_eq!(site.audit_count("device.quarantined", "pump-1"), 1);
    assert_eq!(site.audit_count("device.released", "pump-1"), 1);
}

/// The gid of the `wardgate` group; the test fails loudly without it.
fn wardgate_gid() -> u32 {
    wardgate::admin::group_id("wardgate").expect(
        "no group `wardgate`: create it with `groupadd --system wardgate` (scripts/test does)",
    )
}

/// Runs `wardgate ARGS` as uid/gid 65534 (nobody) with the given supplementary groups.
fn as_nobody(bin: &std::path::Path, groups: &str, args: &[&str]) -> (bool, String) {
    require("setpriv", "util-linux");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.arg(format!("--groups={groups}"));
    }
    let out = cmd.arg(bin).args(args).output().expect("run setpriv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn admin_socket_refuses_a_user_outside_the_wardgate_group() {
    let gid = wardgate_gid();
    let site = Site::ward();
    // nobody must be able to reach the socket's directory and run the binary, so that only
    // the socket's own permissions decide.
    let open = |p: &std::path::Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap()
    };
    open(site.path("").as_path());
    std::fs::create_dir_all(site.path("admin")).unwrap();
    open(&site.path("admin"));
    let bin = site.path("wardgate");
    std::fs::copy(WARDGATE, &bin).unwrap();
    open(&bin);
    let mut gw = site.start().await;

    let socket = site.admin_socket();
    let meta = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, gid));

    let socket_arg = socket.to_str().unwrap();
    let (ok, out) = as_nobody(&bin, "", &["status", "--socket", socket_arg]);
    assert!(!ok, "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    let (ok, out) = as_nobody(&bin, &gid.to_string(), &["status", "--socket", socket_arg]);
    assert!(ok, "a member of the group is served: {out}");

    // Second layer: with the file opened up by mistake, the gateway still checks the
    // caller's credentials and audits the refusal.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, out) = as_nobody(&bin, "", &["device", "list", "--socket", socket_arg]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("not allowed") && out.contains("uid=65534"),
        "{out}"
    );
    gw.wait_log("admin.refused", &["uid=65534"]).await;
    assert!(gw.stop().await.success());
    assert!(!socket.exists(), "the socket is removed at shutdown");
}
