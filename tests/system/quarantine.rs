//! Quarantine after repeated ACL violations: refused at the edge, audited, kept across
//! restarts until released through the admin socket.

use rumqttc::{AsyncClient, ConnectReturnCode};

use crate::edge::assert_serving;
use crate::support::clients::{device_tls, expect_connack_refusal, forge_publish, options, Client};
use crate::support::{Gateway, Site};

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
    let shown = site.device_json("pump-1");
    assert!(
        shown["quarantine"]["reason"]
            .as_str()
            .unwrap()
            .contains("3 ACL violations"),
        "{shown}"
    );

    // Released by an engineer: served again at once, and after another restart.
    site.admin_ok(&["device", "release", "pump-1"]);
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/rate", b"5").await;
    drop(pump);
    assert!(gw.stop().await.success());
    let gw = Gateway::start(&config).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/rate", b"6").await;
    assert_eq!(
        site.device_json("pump-1")["quarantine"],
        serde_json::Value::Null
    );
    drop(pump);
    assert!(gw.stop().await.success());

    assert_eq!(site.audit_count("device.quarantined", "pump-1"), 1);
    assert_eq!(site.audit_count("device.released", "pump-1"), 1);
}
