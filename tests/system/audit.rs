//! The audit log from outside: what the gateway's refusals leave in it, and what
//! `wardgate audit verify` says when someone edits it.

use rumqttc::mqttbytes::v4::{Packet as RawPacket, Publish};
use rumqttc::{AsyncClient, ConnectReturnCode, QoS};

use crate::support::clients::{
    self, device_tls, expect_connack_refusal, expect_tls_refusal, options, Raw,
};
use crate::support::{wardgate, Site};

fn count(records: &[serde_json::Value], event: &str, detail: &str) -> usize {
    records
        .iter()
        .filter(|r| r["event"] == event && r["detail"].as_str().unwrap().contains(detail))
        .count()
}

#[tokio::test]
async fn every_refusal_leaves_exactly_one_audit_record_with_its_reason() {
    let site = Site::ward();
    site.issue("ghost");
    let other = Site::ward_of("st-elsewhere");
    let mut gw = site.start().await;

    let (_c, el) = AsyncClient::new(options("ghost", gw.port(), device_tls(&site, "ghost")), 8);
    expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    let (_c, el) = AsyncClient::new(options("pump-2", gw.port(), device_tls(&site, "pump-1")), 8);
    expect_connack_refusal(el, ConnectReturnCode::BadClientId).await;
    let tls = clients::tls_config(&site.ca(), &other.cert("pump-1"), &other.key("pump-1"));
    let (_c, el) = AsyncClient::new(options("pump-1", gw.port(), tls), 8);
    expect_tls_refusal(el).await;
    // pump-1 forges an alarm in pump-2's name.
    clients::forge_publish(&site, "pump-1", gw.port(), "ward/pump-2/alarm/forged").await;
    let mut raw = Raw::connect(&site, "pump-2", gw.edge).await;
    raw.send(&RawPacket::Publish(Publish::new(
        "ward/pump-2/#",
        QoS::AtMostOnce,
        "x",
    )))
    .await;
    raw.expect_closed().await;
    let mut raw = Raw::connect(&site, "nurse-1", gw.edge).await;
    let mut big = Publish::new("ward/nurse-1/ack/x", QoS::AtLeastOnce, vec![0u8; 2000]);
    big.pkid = 1;
    raw.send(&RawPacket::Publish(big)).await;
    raw.expect_closed().await;
    gw.wait_log("edge.oversized_packet", &["device=nurse-1"])
        .await;
    assert!(gw.stop().await.success());

    let data = site.path("data");
    let (status, out, err) = wardgate(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("chain intact"), "{out}");

    let records = site.audit_records();
    for (event, detail) in [
        ("edge.connect_refused", "code=unregistered"),
        ("edge.connect_refused", "code=client_id_mismatch"),
        ("edge.connect_refused", "UnknownIssuer"),
        ("edge.acl_violation", "code=publish_denied"),
        ("edge.protocol_violation", "code=wildcard_publish"),
        (
            "edge.oversized_packet",
            "2000 bytes exceeds the limit of 1024",
        ),
    ] {
        assert_eq!(
            count(&records, event, detail),
            1,
            "{event} {detail}: {records:#?}"
        );
    }
    let ghost = records
        .iter()
        .find(|r| r["detail"].as_str().unwrap().contains("code=unregistered"))
        .unwrap();
    assert_eq!(ghost["device"], "ghost");
    // Connections that were let in are audited too.
    assert!(count(&records, "edge.connected", "class=infusion-pump") >= 2);
}

#[tokio::test]
async fn one_edited_byte_makes_verify_name_the_record() {
    let site = Site::ward();
    site.issue("ghost");
    let mut gw = site.start().await;
    for _ in 0..3 {
        let (_c, el) = AsyncClient::new(options("ghost", gw.port(), device_tls(&site, "ghost")), 8);
        expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    }
    gw.wait_count("edge.connect_refused", &["ghost"], 3).await;
    assert!(gw.stop().await.success());
    let data = site.path("data");
    let (status, _, _) = wardgate(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(status.success());
    {
        // Offline: turn "ghost" into "ghosT" in record 1.
        let db = sled::open(data.join("audit")).unwrap();
        let chain = db.open_tree("chain").unwrap();
        let mut v = chain.get(1u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let at = v.windows(7).position(|w| w == b"\"ghost\"").unwrap();
        v[at + 5] = b'T';
        chain.insert(1u64.to_be_bytes(), v).unwrap();
        db.flush().unwrap();
    }
    let (status, out, err) = wardgate(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(err.contains("audit record 1 is not valid"), "{err}");
}
