//! Quarantine after repeated ACL violations: refused at the edge, audited, and kept across
//! restarts.

use rumqttc::{AsyncClient, ConnectReturnCode};

use crate::edge::assert_serving;
use crate::support::clients::{device_tls, expect_connack_refusal, forge_publish, options};
use crate::support::{wardgate, Gateway, Site};

#[tokio::test]
async fn repeated_acl_violations_quarantine_the_device_across_restarts() {
    let mut site = Site::ward();
    site.extra = "\n[policy]\nacl_violations = 3\nviolation_window = \"10m\"\n".into();
    let config = site.write_config();
    let mut gw = Gateway::start(&config).await;
    for n in 1..=3 {
        // pump-1 forges an alarm in pump-2's name.
        forge_publish(&site, "pump-1", gw.port(), "ward/pump-2/alarm/forged").await;
        gw.wait_count("edge.acl_violation", &["device=pump-1"], n)
            .await;
    }
    gw.wait_log("device.quarantined", &["device=pump-1", "3 ACL violations"])
        .await;

    let (_c, el) = AsyncClient::new(options("pump-1", gw.port(), device_tls(&site, "pump-1")), 8);
    expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    gw.wait_log(
        "edge.connect_refused",
        &["device=\"pump-1\"", "code=\"quarantined\""],
    )
    .await;
    assert_serving(&site, gw.port()).await;
    assert!(gw.stop().await.success());

    // Still quarantined after a restart.
    let mut gw = Gateway::start(&config).await;
    let (_c, el) = AsyncClient::new(options("pump-1", gw.port(), device_tls(&site, "pump-1")), 8);
    expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    gw.wait_log("edge.connect_refused", &["code=\"quarantined\""])
        .await;
    assert!(gw.stop().await.success());

    let data = site.path("data");
    let (status, out, _) = wardgate(&[
        "audit",
        "tail",
        "--data-dir",
        data.to_str().unwrap(),
        "-n",
        "1000",
        "--json",
    ]);
    assert!(status.success());
    let quarantines = out
        .lines()
        .filter(|l| l.contains("\"event\":\"device.quarantined\"") && l.contains("pump-1"))
        .count();
    assert_eq!(quarantines, 1, "{out}");
}
