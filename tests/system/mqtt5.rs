//! MQTT 5 devices at the edge (issue 15): the CONNACK's limits, refusals with reason codes
//! and the session kept, topic aliases resolved before the ACL, Receive Maximum both ways,
//! properties carried upstream, the Session Expiry Interval on the broker session, and
//! local delivery through the 3.1.1 broker. Clients: a raw v5 client written with rumqttc's
//! v5 codec (exact packets and reason codes), rumqttc's v5 client, and
//! mosquitto_pub/mosquitto_sub `-V mqttv5` as an independent implementation.

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, DisconnectReasonCode, Filter, Packet, PubAck,
    PubAckReason, Publish, PublishProperties, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use std::time::Duration;

use crate::support::clients::{
    device_tls, mosquitto_pub, mosquitto_sub_with, publish_until_received, Raw,
};
use crate::support::upstream::{property, Link, Upstream};
use crate::support::{Site, DEADLINE};

/// A TLS connection speaking MQTT 5 packet by packet.
struct V5 {
    raw: Raw,
    buf: BytesMut,
}

impl V5 {
    /// Connects `device` with `props`; returns the connection and the CONNACK.
    async fn connect_with(
        site: &Site,
        gateway: std::net::SocketAddr,
        device: &str,
        clean_start: bool,
        props: Option<ConnectProperties>,
    ) -> (V5, ConnAck) {
        let mut c = V5 {
            raw: Raw::open(site, device, gateway, None).await,
            buf: BytesMut::new(),
        };
        let connect = Connect {
            keep_alive: 30,
            client_id: device.to_owned(),
            clean_start,
            properties: props,
        };
        c.send(&Packet::Connect(connect, None, None)).await;
        match c.recv().await {
            Some(Packet::ConnAck(a)) => (c, a),
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }

    async fn connect(site: &Site, gateway: std::net::SocketAddr, device: &str) -> V5 {
        let (c, ack) = V5::connect_with(site, gateway, device, true, None).await;
        assert_eq!(
            ack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
        c
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).expect("encode");
        self.raw.send_bytes(&out).await;
    }

    /// The next packet, `None` once the gateway closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, None) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("gateway sent a malformed MQTT 5 packet: {e:?}"),
                    }
                }
                match self.raw.tls.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("neither a packet nor a close before the deadline")
    }

    async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, props: PublishProperties) {
        let mut p = Publish::new(topic, qos, Bytes::from_static(b"72"), Some(props));
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await;
    }

    /// Subscribes to `filter` at QoS 1 as packet `pkid`; returns the SUBACK's codes.
    async fn subscribe(&mut self, filter: &str, pkid: u16) -> Vec<SubscribeReasonCode> {
        let mut s = Subscribe::new(Filter::new(filter, QoS::AtLeastOnce), None);
        s.pkid = pkid;
        self.send(&Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => a.return_codes,
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }

    async fn puback(&mut self) -> PubAck {
        match self.recv().await {
            Some(Packet::PubAck(a)) => a,
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }

    /// Reads until a DISCONNECT (returning its reason) and the close after it.
    async fn disconnected(&mut self) -> DisconnectReasonCode {
        loop {
            match self.recv().await {
                Some(Packet::Disconnect(d)) => {
                    assert!(self.recv().await.is_none(), "closed after the DISCONNECT");
                    return d.reason_code;
                }
                Some(_) => {}
                None => panic!("closed without a DISCONNECT"),
            }
        }
    }

    async fn bye(mut self) {
        self.send(&Packet::Disconnect(
            rumqttc::v5::mqttbytes::v5::Disconnect::new(DisconnectReasonCode::NormalDisconnection),
        ))
        .await;
        let _ = self.raw.tls.shutdown().await;
    }
}

fn alias(n: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_mqtt5_device_gets_the_servers_real_limits_and_an_assigned_client_id() {
    let site = Site::ward();
    let gw = site.start().await;
    let (c, ack) = V5::connect_with(&site, gw.edge, "pump-1", true, None).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(64));
    assert_eq!(p.topic_alias_max, Some(16));
    // max_payload 1 KiB plus the largest topic, packet id and fixed header.
    assert_eq!(p.max_packet_size, Some(1024 + 2 + 65_535 + 2 + 5));
    assert_eq!(p.max_qos, None, "QoS 2 is available");
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(0));
    assert_eq!(p.subscription_identifiers_available, Some(0));
    assert_eq!(p.assigned_client_identifier, None);
    c.bye().await;
    // An empty client id is given the certificate's device id [MQTT-3.1.3-6].
    let mut raw = V5 {
        raw: Raw::open(&site, "pump-1", gw.edge, None).await,
        buf: BytesMut::new(),
    };
    raw.send(&Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: String::new(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(
            a.properties.unwrap().assigned_client_identifier.as_deref(),
            Some("pump-1")
        ),
        other => panic!("{other:?}"),
    }
    // Another device's id is refused with 0x85 (Client Identifier not valid).
    let mut other = V5 {
        raw: Raw::open(&site, "pump-1", gw.edge, None).await,
        buf: BytesMut::new(),
    };
    other
        .send(&Packet::Connect(
            Connect {
                keep_alive: 30,
                client_id: "pump-2".into(),
                clean_start: true,
                properties: None,
            },
            None,
            None,
        ))
        .await;
    match other.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(
            a.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::ClientIdentifierNotValid
        ),
        p => panic!("{p:?}"),
    }
}

/// The device's properties reach the upstream; PUBACK 0x87 for a PUBLISH outside the ACL,
/// SUBACK 0x87 (0x9E for a shared subscription) per refused filter, 0x99 for a payload
/// that is not the UTF-8 it claims, the session kept, each refusal audited; the violation
/// that reaches the quarantine threshold ends the session with DISCONNECT 0x98, and the
/// next CONNECT is refused with 0x8A (Banned).
#[tokio::test]
async fn refusals_carry_reason_codes_the_session_is_kept_and_properties_go_upstream() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;

    let props = PublishProperties {
        content_type: Some("application/json".into()),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        user_properties: vec![("unit".into(), "bpm".into())],
        ..Default::default()
    };
    pump.publish("ward/pump-1/vitals/hr", QoS::AtLeastOnce, 1, props)
        .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    let got = consumer.next().await;
    assert_eq!(&got.topic[..], b"hospital/st-mary/gw-test/pump-1/vitals/hr");
    let p = got.properties.as_ref().unwrap();
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.payload_format_indicator, Some(1));
    let left = p.message_expiry_interval.unwrap();
    assert!((3500..=3600).contains(&left), "remaining expiry {left}");
    assert_eq!(property(&got, "unit"), Some("bpm"));
    assert!(property(&got, "wardgate-seq").is_some());

    // A payload marked UTF-8 that is not: 0x99, the session kept.
    let mut bad = Publish::new(
        "ward/pump-1/vitals/hr",
        QoS::AtLeastOnce,
        Bytes::from_static(&[0xff, 0xfe]),
        Some(PublishProperties {
            payload_format_indicator: Some(1),
            ..Default::default()
        }),
    );
    bad.pkid = 2;
    pump.send(&Packet::Publish(bad)).await;
    assert_eq!(
        pump.puback().await.reason,
        PubAckReason::PayloadFormatInvalid
    );

    // Violation 1 of the threshold's 3: PUBACK 0x87.
    pump.publish(
        "ward/pump-2/vitals/hr",
        QoS::AtLeastOnce,
        3,
        Default::default(),
    )
    .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::NotAuthorized);
    gw.wait_log(
        "edge.acl_violation",
        &["device=pump-1", "code=\"publish_denied\"", "puback_0x87"],
    )
    .await;
    // Violation 2: a shared subscription, refused with 0x9E beside the granted filter.
    let mut s = Subscribe::new(Filter::new("ward/pump-1/cmd/#", QoS::AtLeastOnce), None);
    s.filters
        .push(Filter::new("$share/g/ward/pump-1/cmd/#", QoS::AtLeastOnce));
    s.pkid = 4;
    pump.send(&Packet::Subscribe(s)).await;
    match pump.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::SharedSubscriptionsNotSupported,
            ]
        ),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
    gw.wait_log("edge.acl_violation", &["device=pump-1", "suback_0x87"])
        .await;

    // A user property under the gateway's own names is a protocol error: 0x82.
    let forged = PublishProperties {
        user_properties: vec![("wardgate-seq".into(), "1".into())],
        ..Default::default()
    };
    pump.publish("ward/pump-1/vitals/hr", QoS::AtLeastOnce, 5, forged)
        .await;
    assert_eq!(
        pump.disconnected().await,
        DisconnectReasonCode::ProtocolError
    );
    gw.wait_log("edge.protocol_violation", &["device=pump-1", "wardgate-"])
        .await;

    // Violation 3, a filter outside the ACL: quarantined, DISCONNECT 0x98 (the SUBACK
    // 0x87 may come first).
    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    let mut s = Subscribe::new(Filter::new("ward/#", QoS::AtLeastOnce), None);
    s.pkid = 6;
    pump.send(&Packet::Subscribe(s)).await;
    let reason = loop {
        match pump.recv().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.return_codes, [SubscribeReasonCode::NotAuthorized])
            }
            Some(Packet::Disconnect(d)) => break d.reason_code,
            other => panic!("expected SUBACK or DISCONNECT, got {other:?}"),
        }
    };
    assert_eq!(reason, DisconnectReasonCode::AdministrativeAction);
    gw.wait_log("device.quarantined", &["device=pump-1"]).await;
    let (_, ack) = V5::connect_with(&site, gw.edge, "pump-1", true, None).await;
    assert_eq!(
        ack.code,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Banned
    );
}

/// An alias is resolved before the ACL judges the PUBLISH, every time: it never lets a
/// device past it; an alias out of range ends the session with 0x94.
#[tokio::test]
async fn topic_aliases_are_resolved_before_the_acl() {
    let mut site = Site::ward();
    // The pumps' class allows two aliases (the default is 16).
    site.classes[0].extra = "topic_alias_maximum = 2";
    let mut gw = site.start().await;
    let mut nurse = V5::connect(&site, gw.edge, "nurse-1").await;
    nurse.subscribe("ward/+/alarm/#", 1).await;

    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    pump.publish("ward/pump-1/alarm/occlusion", QoS::AtLeastOnce, 1, alias(1))
        .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    pump.publish("", QoS::AtLeastOnce, 2, alias(1)).await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    for _ in 0..2 {
        match nurse.recv().await {
            Some(Packet::Publish(p)) => assert_eq!(&p.topic[..], b"ward/pump-1/alarm/occlusion"),
            other => panic!("{other:?}"),
        }
    }
    // Alias 2 set to a topic outside the ACL: refused when set, and when used.
    pump.publish("ward/pump-2/alarm/occlusion", QoS::AtLeastOnce, 3, alias(2))
        .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::NotAuthorized);
    pump.publish("", QoS::AtLeastOnce, 4, alias(2)).await;
    assert_eq!(pump.puback().await.reason, PubAckReason::NotAuthorized);
    // The log line may follow the PUBACK: wait for both.
    gw.wait_count(
        "edge.acl_violation",
        &["device=pump-1", "ward/pump-2/alarm/occlusion"],
        2,
    )
    .await;
    assert_eq!(
        gw.events(
            "edge.acl_violation",
            &["device=pump-1", "ward/pump-2/alarm/occlusion"]
        )
        .len(),
        2
    );
    // Past the class's Topic Alias Maximum: DISCONNECT 0x94.
    pump.publish("ward/pump-1/alarm/x", QoS::AtLeastOnce, 5, alias(3))
        .await;
    assert_eq!(
        pump.disconnected().await,
        DisconnectReasonCode::TopicAliasInvalid
    );
    gw.wait_log(
        "edge.protocol_violation",
        &["device=pump-1", "topic alias 3 outside 1..=2"],
    )
    .await;
}

/// Inbound: more QoS 2 PUBLISHes unanswered than the class's `receive_maximum` ends the
/// session with 0x93. Outbound: deliveries wait for the device's own Receive Maximum.
#[tokio::test]
async fn receive_maximum_is_honoured_both_ways() {
    let mut site = Site::ward();
    site.classes[0].extra = "receive_maximum = 8";
    let mut gw = site.start().await;
    let (mut nurse, _) = V5::connect_with(
        &site,
        gw.edge,
        "nurse-1",
        true,
        Some(ConnectProperties {
            receive_maximum: Some(2),
            ..ConnectProperties::new()
        }),
    )
    .await;
    nurse.subscribe("ward/+/alarm/#", 1).await;
    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    for i in 1..=4 {
        pump.publish(
            &format!("ward/pump-1/alarm/{i}"),
            QoS::AtLeastOnce,
            i,
            Default::default(),
        )
        .await;
        assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    }
    let mut delivered = Vec::new();
    for _ in 0..2 {
        match nurse.recv().await {
            Some(Packet::Publish(p)) => delivered.push(p),
            other => panic!("{other:?}"),
        }
    }
    // Two unacknowledged: the next packet is the answer to a PINGREQ, not a third.
    nurse
        .send(&Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    match nurse.recv().await {
        Some(Packet::PingResp(_)) => {}
        other => panic!("a delivery past the device's Receive Maximum: {other:?}"),
    }
    // One acknowledged, one more comes.
    nurse
        .send(&Packet::PubAck(PubAck::new(delivered[0].pkid, None)))
        .await;
    match nurse.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.topic[..], b"ward/pump-1/alarm/3"),
        other => panic!("{other:?}"),
    }

    // 9 QoS 2 PUBLISHes without a PUBREL: one past the class's Receive Maximum.
    let mut all = BytesMut::new();
    for i in 1..=9u16 {
        let mut p = Publish::new("ward/pump-1/vitals/x", QoS::ExactlyOnce, "v", None);
        p.pkid = 100 + i;
        Packet::Publish(p).write(&mut all, None).unwrap();
    }
    pump.raw.send_bytes(&all).await;
    assert_eq!(
        pump.disconnected().await,
        DisconnectReasonCode::ReceiveMaximumExceeded
    );
    gw.wait_log(
        "edge.protocol_violation",
        &["device=pump-1", "code=\"receive_maximum_exceeded\""],
    )
    .await;
}

/// Session Expiry Interval on the 3.1.1 broker session: a lasting session resumes with
/// its queued messages; one resumed with expiry 0 ends with its connection.
#[tokio::test]
async fn the_session_expiry_interval_decides_what_the_broker_keeps() {
    let site = Site::ward();
    let gw = site.start().await;
    let lasting = || {
        Some(ConnectProperties {
            session_expiry_interval: Some(3600),
            ..ConnectProperties::new()
        })
    };
    let (mut nurse, ack) = V5::connect_with(&site, gw.edge, "nurse-1", true, lasting()).await;
    assert!(!ack.session_present);
    nurse.subscribe("ward/+/alarm/#", 1).await;
    nurse.bye().await;

    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    pump.publish(
        "ward/pump-1/alarm/while-away",
        QoS::AtLeastOnce,
        1,
        Default::default(),
    )
    .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);

    // Resumed, with expiry 0 now: the queued alarm comes, and the session ends with it.
    let (mut nurse, ack) = V5::connect_with(
        &site,
        gw.edge,
        "nurse-1",
        false,
        Some(ConnectProperties {
            session_expiry_interval: Some(0),
            ..ConnectProperties::new()
        }),
    )
    .await;
    assert!(ack.session_present);
    match nurse.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.topic[..], b"ward/pump-1/alarm/while-away");
            nurse.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
        }
        other => panic!("{other:?}"),
    }
    nurse.bye().await;
    // Nothing kept: no session, and an alarm published now is not queued for it.
    pump.publish(
        "ward/pump-1/alarm/after-end",
        QoS::AtLeastOnce,
        2,
        Default::default(),
    )
    .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    let (mut nurse, ack) = V5::connect_with(&site, gw.edge, "nurse-1", false, lasting()).await;
    assert!(
        !ack.session_present,
        "the session ended with its connection"
    );
    // A marker through a fresh subscription arrives first: nothing queued came before it.
    nurse.subscribe("ward/+/alarm/#", 2).await;
    pump.publish(
        "ward/pump-1/alarm/marker",
        QoS::AtLeastOnce,
        3,
        Default::default(),
    )
    .await;
    match nurse.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.topic[..], b"ward/pump-1/alarm/marker"),
        other => panic!("{other:?}"),
    }
}

/// mosquitto's own MQTT 5 clients: a publish with properties reaches a local v5
/// subscriber (payload, QoS, retain kept) and the upstream (properties kept); a forbidden
/// one is reported as refused by mosquitto_pub.
#[tokio::test]
async fn mosquitto_clients_speaking_mqtt5_are_served() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    let port = gw.port();
    let mut sub = mosquitto_sub_with(
        &site,
        "nurse-1",
        port,
        "ward/+/alarm/#",
        1,
        &["-V", "mqttv5"],
    );
    let stdout = publish_until_received(&mut sub, async || {
        let out = mosquitto_pub(
            &site,
            "pump-1",
            port,
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "ward/pump-1/alarm/occlusion",
                "-m",
                "occluded",
                "-D",
                "publish",
                "user-property",
                "unit",
                "ml/h",
                "-D",
                "publish",
                "content-type",
                "text/plain",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
    assert_eq!(stdout.trim(), "ward/pump-1/alarm/occlusion occluded");
    let got = consumer.next().await;
    assert_eq!(property(&got, "unit"), Some("ml/h"));
    assert_eq!(
        got.properties.as_ref().unwrap().content_type.as_deref(),
        Some("text/plain")
    );
    let out = mosquitto_pub(
        &site,
        "pump-1",
        port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "ward/pump-2/alarm/x",
            "-m",
            "forged",
        ],
    );
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("Not authorized"),
        "mosquitto_pub said: {said}"
    );
    gw.wait_log("edge.acl_violation", &["device=pump-1", "puback_0x87"])
        .await;
}

/// A connection taken over by a newer one gets DISCONNECT 0x8E, and its end (it had
/// resumed the session with Session Expiry 0) leaves the newer connection's broker session
/// alone: an alarm published after it ended still reaches the new connection.
#[tokio::test]
async fn a_taken_over_session_ends_with_0x8e_and_spares_its_successor() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let props = |secs| {
        Some(ConnectProperties {
            session_expiry_interval: Some(secs),
            ..ConnectProperties::new()
        })
    };
    let (mut first, _) = V5::connect_with(&site, gw.edge, "nurse-1", true, props(3600)).await;
    first.subscribe("ward/+/alarm/#", 1).await;
    first.bye().await;
    // Resumed with expiry 0: the broker's session is purged when this connection ends...
    let (mut old, ack) = V5::connect_with(&site, gw.edge, "nurse-1", false, props(0)).await;
    assert!(ack.session_present);
    // ...but a newer connection takes it over first.
    let (mut new, ack) = V5::connect_with(&site, gw.edge, "nurse-1", false, props(3600)).await;
    assert!(ack.session_present);
    assert_eq!(
        old.disconnected().await,
        DisconnectReasonCode::SessionTakenOver
    );
    // Its end, and whatever it did at its end, is over once it is logged.
    gw.wait_log(
        "edge.disconnected",
        &["device=nurse-1", "closed by the gateway"],
    )
    .await;
    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    pump.publish(
        "ward/pump-1/alarm/after-takeover",
        QoS::AtLeastOnce,
        1,
        Default::default(),
    )
    .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    match new.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.topic[..], b"ward/pump-1/alarm/after-takeover"),
        other => panic!("the new connection lost its session: {other:?}"),
    }
}

/// rumqttc's MQTT 5 client as a device: its eventloop in a task, every packet it receives
/// forwarded, and the error that ends it.
struct Rumqttc5 {
    client: rumqttc::v5::AsyncClient,
    incoming: mpsc::UnboundedReceiver<Packet>,
    ended: mpsc::UnboundedReceiver<rumqttc::v5::ConnectionError>,
}

impl Rumqttc5 {
    async fn connect(site: &Site, device: &str, port: u16, max_packet: Option<u32>) -> Rumqttc5 {
        let mut o = rumqttc::v5::MqttOptions::new(device, "127.0.0.1", port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            device_tls(site, device),
        )));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(max_packet);
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 64);
        let (itx, incoming) = mpsc::unbounded_channel();
        let (etx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::PingResp(_))) => {}
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        let _ = itx.send(p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = etx.send(e);
                        return;
                    }
                }
            }
        });
        let mut c = Rumqttc5 {
            client,
            incoming,
            ended,
        };
        match c.next().await {
            Packet::ConnAck(a) => assert_eq!(
                a.code,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
            ),
            other => panic!("expected a CONNACK, got {other:?}"),
        }
        c
    }

    /// The next packet the client received, within the deadline.
    async fn next(&mut self) -> Packet {
        match tokio::time::timeout(DEADLINE, self.incoming.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("connection ended: {:?}", self.ended.try_recv()),
            Err(_) => panic!("nothing received before the deadline"),
        }
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self.next().await {
            Packet::SubAck(a) => a.return_codes,
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason.
    async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        props: PublishProperties,
    ) -> PubAckReason {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
            .await
            .unwrap();
        match self.next().await {
            Packet::PubAck(a) => a.reason,
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }

    /// Waits for the gateway to end the connection with a DISCONNECT; returns its reason.
    async fn disconnected(&mut self) -> DisconnectReasonCode {
        match tokio::time::timeout(DEADLINE, self.ended.recv()).await {
            Ok(Some(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
            ))) => reason_code,
            other => panic!("expected a DISCONNECT from the gateway, got {other:?}"),
        }
    }
}

/// rumqttc's own MQTT 5 client as the devices: SUBACK per filter, a local delivery at the
/// QoS published with its properties, PUBACK 0x87 with the session kept, QoS 2 through the
/// client's own state machine, a delivery over the subscriber's Maximum Packet Size dropped
/// (the next one still delivered), and DISCONNECT 0x8B (Server shutting down) to every
/// device when the gateway stops.
#[tokio::test]
async fn rumqttcs_mqtt5_client_is_served_as_a_device() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    let port = gw.port();
    let mut nurse = Rumqttc5::connect(&site, "nurse-1", port, Some(512)).await;
    assert_eq!(
        nurse.subscribe("ward/+/alarm/#").await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        nurse.subscribe("ward/+/vitals/#").await,
        [SubscribeReasonCode::NotAuthorized]
    );
    let mut pump = Rumqttc5::connect(&site, "pump-1", port, None).await;
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("unit".into(), "ml/h".into())],
        ..Default::default()
    };
    assert_eq!(
        pump.publish("ward/pump-1/alarm/occlusion", b"occluded", props.clone())
            .await,
        PubAckReason::Success
    );
    match nurse.next().await {
        Packet::Publish(p) => {
            assert_eq!(&p.topic[..], b"ward/pump-1/alarm/occlusion");
            assert_eq!(&p.payload[..], b"occluded");
            assert_eq!(p.qos, QoS::AtLeastOnce);
        }
        other => panic!("expected the alarm, got {other:?}"),
    }
    let got = consumer.next().await;
    assert_eq!(&got.payload[..], b"occluded");
    assert_eq!(property(&got, "unit"), Some("ml/h"));
    assert_eq!(
        got.properties.as_ref().unwrap().content_type.as_deref(),
        Some("text/plain")
    );

    // Outside the ACL: PUBACK 0x87 and the connection goes on.
    assert_eq!(
        pump.publish("ward/pump-2/alarm/x", b"forged", Default::default())
            .await,
        PubAckReason::NotAuthorized
    );
    gw.wait_log("edge.acl_violation", &["device=pump-1", "puback_0x87"])
        .await;
    // QoS 2 through rumqttc's PUBREC/PUBREL/PUBCOMP.
    pump.client
        .publish("ward/pump-1/alarm/air", QoS::ExactlyOnce, false, "air")
        .await
        .unwrap();
    loop {
        match pump.next().await {
            Packet::PubRec(r) => {
                assert_eq!(r.reason, rumqttc::v5::mqttbytes::v5::PubRecReason::Success)
            }
            Packet::PubComp(_) => break,
            other => panic!("expected PUBREC/PUBCOMP, got {other:?}"),
        }
    }
    // The nurse asked for packets of at most 512 bytes: a 900-byte alarm is not sent to
    // it (the edge logs the drop), the next small one is, at the QoS 1 it was granted.
    assert_eq!(
        pump.publish("ward/pump-1/alarm/big", &[b'b'; 900], Default::default())
            .await,
        PubAckReason::Success
    );
    assert_eq!(
        pump.publish("ward/pump-1/alarm/small", b"s", Default::default())
            .await,
        PubAckReason::Success
    );
    let mut topics = Vec::new();
    while topics.last().map(Vec::as_slice) != Some(&b"ward/pump-1/alarm/small"[..]) {
        match nurse.next().await {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtLeastOnce, "min(published, granted)");
                topics.push(p.topic.to_vec());
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(
        topics,
        [
            b"ward/pump-1/alarm/air".to_vec(),
            b"ward/pump-1/alarm/small".to_vec()
        ]
    );
    gw.wait_log(
        "edge.delivery_too_large",
        &["device=nurse-1", "ward/pump-1/alarm/big"],
    )
    .await;

    assert!(gw.stop().await.success());
    assert_eq!(
        pump.disconnected().await,
        DisconnectReasonCode::ServerShuttingDown
    );
    assert_eq!(
        nurse.disconnected().await,
        DisconnectReasonCode::ServerShuttingDown
    );
}

/// A full spool refuses an MQTT 5 device's alarm with PUBACK 0x97 (Quota exceeded) and
/// keeps the session: once the uplink has drained what was accepted — every acknowledged
/// alarm arrives upstream — the same connection's next alarm is accepted.
#[tokio::test]
async fn a_full_spool_answers_0x97_and_keeps_the_session() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, false).await;
    site.extra = upstream.uplink_section(
        "gw-test",
        link.port,
        "\n[spool]\nmax_bytes = \"64KiB\"\ndevice_quota = \"64KiB\"\n",
    );
    let mut gw = site.start().await;
    let mut pump = Rumqttc5::connect(&site, "pump-1", gw.port(), None).await;
    let body = [b'a'; 1000];
    let mut accepted = 0;
    loop {
        let topic = format!("ward/pump-1/alarm/{accepted}");
        match pump.publish(&topic, &body, Default::default()).await {
            PubAckReason::Success => accepted += 1,
            PubAckReason::QuotaExceeded => break,
            other => panic!("unexpected PUBACK {other:?}"),
        }
        assert!(accepted < 200, "a 64KiB spool cannot hold 200 KB of alarms");
    }
    assert!(accepted > 30, "only {accepted} alarms stored");
    gw.wait_log("spool.refused", &["device=pump-1", "priority=alarm"])
        .await;

    let mut consumer = upstream.consumer("hospital/#").await;
    link.set_up(true);
    let got = consumer.until(|g| g.len() >= accepted).await;
    assert_eq!(got.len(), accepted, "every acknowledged alarm, once");
    // The spool is empty once the upstream's PUBACKs are committed; then the same
    // connection's next alarm is taken.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&site.admin_ok(&["status", "--json"])).unwrap();
        if status["spool"]["records"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spool never drained: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pump.publish("ward/pump-1/alarm/after", b"x", Default::default())
            .await,
        PubAckReason::Success
    );
    consumer
        .until(|g| g.iter().any(|p| p.topic.ends_with(b"/alarm/after")))
        .await;
}

/// Both expiry intervals as time really passes (the unit tests inject a clock): a session
/// with a 1 s Session Expiry Interval is gone when its device comes back after it, and a
/// record with a 1 s Message Expiry Interval waiting in the spool is expired, audited and
/// never sent, while the record beside it without one is.
#[tokio::test]
async fn expiry_intervals_run_out_on_the_clock() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, false).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "");
    let mut gw = site.start().await;
    let expiring = |secs| {
        Some(ConnectProperties {
            session_expiry_interval: Some(secs),
            ..ConnectProperties::new()
        })
    };
    let (mut nurse, _) = V5::connect_with(&site, gw.edge, "nurse-1", true, expiring(1)).await;
    nurse.subscribe("ward/+/alarm/#", 1).await;
    nurse.bye().await;
    let mut pump = V5::connect(&site, gw.edge, "pump-1").await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    pump.publish("ward/pump-1/alarm/short-lived", QoS::AtLeastOnce, 1, short)
        .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    pump.publish(
        "ward/pump-1/alarm/lasting",
        QoS::AtLeastOnce,
        2,
        Default::default(),
    )
    .await;
    assert_eq!(pump.puback().await.reason, PubAckReason::Success);
    let published = tokio::time::Instant::now();

    // The passing of the intervals is what is under test: wait them out.
    tokio::time::sleep_until(published + Duration::from_millis(1500)).await;

    let (_nurse, ack) = V5::connect_with(&site, gw.edge, "nurse-1", false, expiring(60)).await;
    assert!(
        !ack.session_present,
        "the session outlived its Session Expiry Interval"
    );
    let mut consumer = upstream.consumer("hospital/#").await;
    link.set_up(true);
    let got = consumer.next().await;
    assert_eq!(
        &got.topic[..],
        b"hospital/st-mary/gw-test/pump-1/alarm/lasting",
        "the expired record was sent"
    );
    gw.wait_log("spool.expired", &["device=pump-1", "count=1"])
        .await;
    assert!(gw.stop().await.success());
    assert_eq!(site.audit_count("spool.expired", "pump-1"), 1);
}
