//! The command line: configuration checking and the PKI commands' refusals.

use crate::support::{wardgate, Gateway, Site, DEADLINE, WARDGATE};

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/wardgate.toml");
    let (status, out, err) = wardgate(&["check-config", "--config", example]);
    assert!(status.success(), "{err}");
    assert!(out.contains("ok (3 device classes, 3 devices)"), "{out}");
}

#[test]
fn check_config_reports_every_error_with_its_line_and_exits_78() {
    let site = Site::ward();
    let path = site.path("bad.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"gw\"\nsite = \"st mary\"\ndata_dir = \"d\"\n\n[edge]\nlisten = \"nowhere\"\n\
         ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\n[[device]]\nid = \"x\"\nclass = \"nope\"\naddress = \"1.2.3.4\"\n",
    )
    .unwrap();
    let (status, _, err) = wardgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(78), "{err}");
    let p = path.display();
    assert!(err.contains(&format!("{p}:3:8: site:")), "{err}");
    assert!(
        err.contains(&format!("{p}:7:10: edge listen address")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{p}:14:9: unknown device class \"nope\"")),
        "{err}"
    );
    assert!(err.contains("has 3 error(s)"), "{err}");
}

#[test]
fn run_refuses_an_invalid_configuration_with_78() {
    let site = Site::ward();
    let path = site.path("bad.toml");
    std::fs::write(&path, "[gateway]\n").unwrap();
    let (status, _, err) = wardgate(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(78), "{err}");
}

#[test]
fn pki_init_refuses_to_overwrite_and_revoke_needs_a_known_device() {
    let site = Site::ward();
    let pki = site.pki();
    let (status, _, err) =
        wardgate(&["pki", "init", "--dir", pki.to_str().unwrap(), "--site", "x"]);
    assert!(!status.success());
    assert!(err.contains("refusing to overwrite"), "{err}");
    let (status, _, err) = wardgate(&["pki", "revoke", "stranger", "--dir", pki.to_str().unwrap()]);
    assert!(!status.success());
    assert!(
        err.contains("no certificate was issued to device stranger"),
        "{err}"
    );
    let (status, _, err) = wardgate(&[
        "pki",
        "issue",
        "bad/#",
        "--dir",
        pki.to_str().unwrap(),
        "--out",
        "/tmp",
    ]);
    assert!(!status.success());
    assert!(err.contains("invalid device id"), "{err}");
}

#[tokio::test]
async fn readiness_is_notified_to_systemd() {
    let site = Site::ward();
    let socket_path = site.path("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let gw =
        Gateway::start_with_env(&site.write_config(), &[("NOTIFY_SOCKET", &socket_path)]).await;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    assert!(gw.stop().await.success());
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "STOPPING=1");
}

/// The README's first command: the demo shows traffic flowing, the forged alarm cut off and
/// the unregistered device refused, and exits by itself.
#[test]
fn demo_shows_the_gateway_at_work() {
    let out = std::process::Command::new(WARDGATE)
        .args(["demo", "--duration", "8s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "pump-01 ⇒ ward/pump-01/vitals",
        "nurse-station ⇐ ward/pump-01/alarm/occlusion",
        "nurse-station ⇐ ward/monitor-02/alarm/spo2-low",
        "rogue-03 ✗ disconnected by the gateway",
        "visitor-laptop ✗ connection refused: CONNACK NotAuthorized",
        "2 devices refused",
        "hospital ⇐ hospital/demo-hospital/demo-gateway/pump-01/alarm/occlusion",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("nurse-station ⇐ ward/pump-01/alarm/forged"),
        "{stdout}"
    );
    assert!(stderr.contains("event=\"edge.acl_violation\""), "{stderr}");
}
