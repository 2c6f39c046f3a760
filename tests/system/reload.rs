//! Live reload (`wardgate reload`, SIGHUP): classes and devices applied while healthy
//! sessions go on; a device whose class changed is judged anew at once; an invalid file
//! changes nothing and says why.

use rumqttc::{AsyncClient, ConnectReturnCode};

use crate::support::clients::{device_tls, expect_connack_refusal, options, Client};
use crate::support::Site;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_classes_and_devices_and_keeps_healthy_sessions() {
    let mut site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;

    // The nurse displays' class now also sees vitals; pump-2 leaves; pump-3 arrives.
    site.classes[1].subscribe.push("ward/+/vitals/#");
    site.devices.retain(|(id, _, _)| id != "pump-2");
    site.register("pump-3", "infusion-pump", "127.0.0.1");
    site.write_config();
    let out = site.admin_ok(&["reload"]);
    assert!(
        out.contains("nurse-1 disconnected to be judged anew: class nurse-display changed"),
        "{out}"
    );
    assert!(!out.contains("pump-1"), "{out}");
    gw.wait_log("config.changed", &[]).await;

    // pump-1's class did not change: the same connection goes on.
    pump.publish("ward/pump-1/vitals/hr", b"72").await;
    nurse.closed().await;
    // Judged anew, the nurse display gets its new grant.
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/vitals/#").await;
    let _pump3 = Client::connect(&site, "pump-3", gw.port()).await;
    let (_c, eventloop) =
        AsyncClient::new(options("pump-2", gw.port(), device_tls(&site, "pump-2")), 8);
    expect_connack_refusal(eventloop, ConnectReturnCode::NotAuthorized).await;

    // SIGHUP does the same: pump-2 back.
    site.register("pump-2", "infusion-pump", "127.0.0.1");
    site.write_config();
    gw.signal("HUP");
    gw.wait_count("config.changed", &[], 2).await;
    let _pump2 = Client::connect(&site, "pump-2", gw.port()).await;
    let _ = gw.stop().await;
    let changed = site
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "config.changed")
        .count();
    assert_eq!(changed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_configuration_changes_nothing_and_says_why() {
    let mut site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    let before = site.admin_ok(&["device", "list"]);

    site.extra.push_str(
        "\n[[device]]\nid = \"Not An Id\"\nclass = \"nowhere\"\naddress = \"127.0.0.1\"\n",
    );
    site.devices.retain(|(id, _, _)| id != "pump-2");
    site.write_config();
    let (status, _, err) = site.admin(&["reload"]);
    assert!(!status.success());
    // Every error, each with its line.
    assert!(
        err.contains("2 error(s)")
            && err.contains("device id may contain only")
            && err.contains("unknown device class \"nowhere\""),
        "{err}"
    );
    gw.wait_log("config.reload_failed", &[]).await;
    // Nothing changed: the same devices, and the session goes on.
    assert_eq!(site.admin_ok(&["device", "list"]), before);
    pump.publish("ward/pump-1/vitals/hr", b"72").await;
    let _ = gw.stop().await;
    assert!(site
        .audit_records()
        .iter()
        .any(|r| r["event"] == "config.reload_failed"
            && r["detail"].as_str().is_some_and(|d| d.contains("nowhere"))));
}
