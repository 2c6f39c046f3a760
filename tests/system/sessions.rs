//! Sessions as the edge keeps them (issue 14: no broker session a device does not need;
//! issue 15: keepalive and resumed sessions as MQTT 3.1.1 says). The edge answers CONNECT,
//! PINGREQ and QoS 1 PUBLISH itself and attaches a device to the embedded broker at its
//! first packet that needs it; `wardgate status` counts the attached connections. Real
//! gateway, raw and rumqttc clients over TLS.

use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet as RawPacket, Publish, Subscribe};
use rumqttc::QoS;

use crate::support::clients::{Client, Raw};
use crate::support::Site;

/// How many device connections `wardgate status` says hold a broker session.
fn broker_sessions(site: &Site) -> usize {
    let status = site.admin_ok(&["status"]);
    let tail = status
        .split_once(" quarantined; ")
        .unwrap_or_else(|| panic!("no broker sessions in {status}"))
        .1;
    tail.split_whitespace().next().unwrap().parse().unwrap()
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> RawPacket {
    let mut p = Publish::new(topic, qos, "72");
    p.pkid = pkid;
    RawPacket::Publish(p)
}

/// A pump that only publishes is served whole by the edge — CONNACK, PUBACK, PINGRESP —
/// without a broker session; its first SUBSCRIBE attaches it, and what it subscribed to
/// reaches it; its session ends with its connection.
#[tokio::test]
async fn a_device_that_only_publishes_holds_no_broker_session() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Raw::connect(&site, "pump-1", gw.edge).await;
    pump.send(&publish("ward/pump-1/vitals/hr", QoS::AtLeastOnce, 7))
        .await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubAck(a)) if a.pkid == 7));
    pump.send(&RawPacket::PingReq).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PingResp)));
    assert_eq!(broker_sessions(&site), 0);

    let mut sub = Subscribe::new("ward/pump-1/cmd/#", QoS::AtLeastOnce);
    sub.pkid = 8;
    pump.send(&RawPacket::Subscribe(sub)).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::SubAck(a)) if a.pkid == 8));
    assert_eq!(broker_sessions(&site), 1);
    // Attached, it is still answered by the edge, and local delivery works.
    pump.send(&RawPacket::PingReq).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PingResp)));
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let mut other = Client::connect(&site, "pump-2", gw.port()).await;
    other
        .publish("ward/pump-2/alarm/occlusion", b"occluded")
        .await;
    assert_eq!(&nurse.next_publish().await.payload[..], b"occluded");

    // pump-2's alarm is wanted locally, so it is attached too; the pump's session ends
    // with its connection (counted down before its disconnection is logged).
    assert_eq!(broker_sessions(&site), 3);
    drop(pump);
    gw.wait_log("edge.disconnected", &["device=pump-1"]).await;
    assert_eq!(broker_sessions(&site), 2);
    gw.stop().await;
}

/// MQTT-3.1.2-24: a device silent for one and a half keepalives is disconnected by the
/// edge itself, as if the network had failed (its will is published); keepalive 0
/// (MQTT-3.1.2-10: no keepalive) is accepted, attached to the broker too (the broker
/// refused it before: issue 15, item 1).
#[tokio::test]
async fn the_edge_keeps_each_device_keepalive_and_accepts_keepalive_zero() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;

    let mut connect = Connect::new("pump-1");
    connect.keep_alive = 1;
    connect.last_will = Some(LastWill::new(
        "ward/pump-1/alarm/offline",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (mut pump, _) = Raw::connect_with(&site, gw.edge, connect).await;
    let started = std::time::Instant::now();
    pump.expect_closed().await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1400),
        "closed after {:?}, before one and a half keepalives",
        started.elapsed()
    );
    gw.wait_log("edge.disconnected", &["device=pump-1", "keepalives"])
        .await;
    assert_eq!(&nurse.next_publish().await.payload[..], b"gone");

    let mut connect = Connect::new("pump-2");
    connect.keep_alive = 0;
    let (mut pump, _) = Raw::connect_with(&site, gw.edge, connect).await;
    let mut sub = Subscribe::new("ward/pump-2/cmd/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    pump.send(&RawPacket::Subscribe(sub)).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::SubAck(_))));
    pump.send(&publish("ward/pump-2/vitals/hr", QoS::AtLeastOnce, 2))
        .await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubAck(a)) if a.pkid == 2));
    gw.stop().await;
}

/// MQTT-3.1.4-2: a second connection under a device's client id takes over; the first is
/// closed, whether or not either holds a broker session, and the second is served.
#[tokio::test]
async fn a_new_connection_of_a_device_takes_over_the_old_one() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut first = Raw::connect(&site, "pump-1", gw.edge).await;
    let mut second = Raw::connect(&site, "pump-1", gw.edge).await;
    first.expect_closed().await;
    second
        .send(&publish("ward/pump-1/vitals/hr", QoS::AtLeastOnce, 3))
        .await;
    assert!(matches!(second.recv().await, Some(RawPacket::PubAck(a)) if a.pkid == 3));
    gw.wait_log(
        "edge.disconnected",
        &["device=pump-1", "closed by the gateway"],
    )
    .await;
    gw.stop().await;
}

/// A device whose will a local subscriber wants, and that never needed the broker, still
/// has that will delivered locally when its connection fails — as the broker does for the
/// sessions it holds — and not when it disconnects cleanly.
#[tokio::test]
async fn the_will_of_a_device_without_a_broker_session_reaches_local_subscribers() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let will = |payload: &str| {
        let mut connect = Connect::new("pump-1");
        connect.last_will = Some(LastWill::new(
            "ward/pump-1/alarm/offline",
            payload,
            QoS::AtLeastOnce,
            false,
        ));
        connect
    };

    let (mut pump, _) = Raw::connect_with(&site, gw.edge, will("clean")).await;
    pump.send(&RawPacket::Disconnect).await;
    pump.expect_closed().await;
    let (pump, _) = Raw::connect_with(&site, gw.edge, will("failed")).await;
    assert_eq!(broker_sessions(&site), 1, "only the nurse display");
    drop(pump);
    assert_eq!(
        &nurse.next_publish().await.payload[..],
        b"failed",
        "the clean DISCONNECT's will is not published"
    );
    gw.stop().await;
}

/// The same for a QoS 2, retained will: the edge publishes it locally at QoS 1 (its one-shot
/// broker connection does no QoS 2 handshake; the upstream copy keeps QoS 2), so a QoS 2
/// subscriber gets it at QoS 1, and a display that subscribes later gets it retained.
#[tokio::test]
async fn a_qos_2_retained_will_without_a_broker_session_is_published_locally_at_qos_1() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse
        .subscribe_qos("ward/+/alarm/#", QoS::ExactlyOnce)
        .await;
    let mut connect = Connect::new("pump-1");
    connect.last_will = Some(LastWill::new(
        "ward/pump-1/alarm/offline",
        "gone",
        QoS::ExactlyOnce,
        true,
    ));
    let (pump, _) = Raw::connect_with(&site, gw.edge, connect).await;
    assert_eq!(broker_sessions(&site), 1, "only the nurse display");
    drop(pump);
    let got = nurse.next_publish().await;
    assert_eq!(
        (&got.payload[..], got.qos),
        (&b"gone"[..], QoS::AtLeastOnce)
    );
    drop(nurse);
    let mut later = Client::connect(&site, "nurse-1", gw.port()).await;
    later.subscribe("ward/+/alarm/#").await;
    let kept = later.next_publish().await;
    assert_eq!((&kept.payload[..], kept.retain), (&b"gone"[..], true));
    gw.stop().await;
}

/// Issue 15, item 2: a device resuming a persistent session with messages queued for it
/// gets them after its CONNACK. The broker sends them in the same read as its CONNACK;
/// the edge used to refuse such a resume with CONNACK 3.
#[tokio::test]
async fn a_resumed_session_gets_what_was_queued_for_it() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let persistent = || {
        let mut c = Connect::new("nurse-1");
        c.clean_session = false;
        c
    };
    let (mut nurse, _) = Raw::connect_with(&site, gw.edge, persistent()).await;
    let mut sub = Subscribe::new("ward/+/alarm/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    nurse.send(&RawPacket::Subscribe(sub)).await;
    assert!(matches!(nurse.recv().await, Some(RawPacket::SubAck(_))));
    drop(nurse);
    gw.wait_log("edge.disconnected", &["device=nurse-1"]).await;

    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    for i in 0..5 {
        pump.publish(&format!("ward/pump-1/alarm/a{i}"), b"queued")
            .await;
    }
    let (mut nurse, present) = Raw::connect_with(&site, gw.edge, persistent()).await;
    assert!(present, "the session was kept");
    for i in 0..5 {
        match nurse.recv().await {
            Some(RawPacket::Publish(p)) => assert_eq!(p.topic, format!("ward/pump-1/alarm/a{i}")),
            other => panic!("expected queued alarm {i}, got {other:?}"),
        }
    }
    gw.stop().await;
}
