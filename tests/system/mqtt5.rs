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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::time::Duration;

use crate::support::clients::{mosquitto_pub, mosquitto_sub_with, Raw};
use crate::support::upstream::{property, Upstream};
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
    let site = Site::ward();
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
    assert_eq!(
        gw.events(
            "edge.acl_violation",
            &["device=pump-1", "ward/pump-2/alarm/occlusion"]
        )
        .len(),
        2
    );
    // Past the Topic Alias Maximum: DISCONNECT 0x94.
    pump.publish("ward/pump-1/alarm/x", QoS::AtLeastOnce, 5, alias(17))
        .await;
    assert_eq!(
        pump.disconnected().await,
        DisconnectReasonCode::TopicAliasInvalid
    );
    gw.wait_log(
        "edge.protocol_violation",
        &["device=pump-1", "topic alias 17"],
    )
    .await;
}

/// Inbound: more QoS 2 PUBLISHes unanswered than the edge's Receive Maximum (64) ends the
/// session with 0x93. Outbound: deliveries wait for the device's own Receive Maximum.
#[tokio::test]
async fn receive_maximum_is_honoured_both_ways() {
    let site = Site::ward();
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

    // 65 QoS 2 PUBLISHes without a PUBREL: one past the edge's Receive Maximum.
    let mut all = BytesMut::new();
    for i in 1..=65u16 {
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
    // Published until the subscriber, whose SUBSCRIBE the test cannot see land, has one.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
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
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(300), sub.wait()).await {
            assert!(status.unwrap().success());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto_sub got nothing"
        );
    }
    let mut stdout = String::new();
    sub.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
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
