//! The edge against real clients: who gets in, what they may do, and that the gateway keeps
//! serving everyone else whatever one device does.

use std::net::IpAddr;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet as RawPacket, Publish, Subscribe};
use rumqttc::{AsyncClient, ConnectReturnCode, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::io::AsyncReadExt;

use crate::support::clients::{
    self, device_tls, expect_connack_refusal, expect_tls_refusal, options, Client, Raw,
};
use crate::support::{require, Site, DEADLINE};

/// The gateway still serves well-behaved devices: pump-2 raises an alarm, nurse-1 gets it.
pub async fn assert_serving(site: &Site, port: u16) {
    let mut nurse = Client::connect(site, "nurse-1", port).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let mut pump = Client::connect(site, "pump-2", port).await;
    pump.publish("ward/pump-2/alarm/check", b"still-serving")
        .await;
    let got = nurse.next_publish().await;
    assert_eq!(got.topic, "ward/pump-2/alarm/check");
    assert_eq!(&got.payload[..], b"still-serving");
}

/// Connects with rumqttc as `client_id` presenting `tls`, expects the TLS handshake to be
/// refused, and waits for the gateway's `code="tls"` refusal naming `why`.
async fn expect_tls_refused(
    gw: &mut crate::support::Gateway,
    client_id: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    why: &str,
) {
    let (_client, eventloop) = AsyncClient::new(options(client_id, gw.port(), tls), 8);
    expect_tls_refusal(eventloop).await;
    gw.wait_log("edge.connect_refused", &["code=\"tls\"", why])
        .await;
}

/// Connects `device` with the raw client, sends `packet`, expects the gateway to close the
/// connection, and waits for `event` with `parts` in its log.
async fn expect_disconnect_for(
    site: &Site,
    gw: &mut crate::support::Gateway,
    device: &str,
    packet: RawPacket,
    event: &str,
    parts: &[&str],
) {
    let mut raw = Raw::connect(site, device, gw.edge).await;
    raw.send(&packet).await;
    raw.expect_closed().await;
    gw.wait_log(event, parts).await;
}

#[tokio::test]
async fn registered_device_publishes_and_granted_subscriber_receives() {
    let site = Site::ward();
    let gw = site.start().await;

    // rumqttc to rumqttc.
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/alarm/occlusion", b"{\"level\":\"high\"}")
        .await;
    let got = nurse.next_publish().await;
    assert_eq!(got.topic, "ward/pump-1/alarm/occlusion");
    assert_eq!(&got.payload[..], b"{\"level\":\"high\"}");
    assert_eq!(got.qos, QoS::AtLeastOnce);

    // An independent client on each side: mosquitto_pub to rumqttc ...
    let out = clients::mosquitto_pub(
        &site,
        "pump-2",
        gw.port(),
        &[
            "-t",
            "ward/pump-2/alarm/air",
            "-m",
            "air-in-line",
            "-q",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = nurse.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("ward/pump-2/alarm/air", &b"air-in-line"[..])
    );

    // ... and rumqttc to mosquitto_sub. mosquitto_sub says nothing once subscribed, so the
    // pump publishes until mosquitto_sub has its message and exits (-C 1).
    let mut sub = clients::mosquitto_sub(&site, "nurse-1", gw.port(), "ward/+/alarm/#", 1);
    let stdout = clients::publish_until_received(&mut sub, async || {
        pump.publish("ward/pump-1/alarm/door", b"open").await
    })
    .await;
    assert_eq!(stdout.trim(), "ward/pump-1/alarm/door open");
}

#[tokio::test]
async fn unregistered_certificate_is_refused_with_not_authorized() {
    let site = Site::ward();
    site.issue("ghost"); // signed by the site CA, but not in the registry
    let mut gw = site.start().await;
    let (_c, eventloop) =
        AsyncClient::new(options("ghost", gw.port(), device_tls(&site, "ghost")), 8);
    expect_connack_refusal(eventloop, ConnectReturnCode::NotAuthorized).await;
    gw.wait_log(
        "edge.connect_refused",
        &["device=\"ghost\"", "code=\"unregistered\""],
    )
    .await;
    // An independent client reads the same refusal.
    let out = clients::mosquitto_pub(
        &site,
        "ghost",
        gw.port(),
        &["-t", "ward/ghost/x", "-m", "x"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not authorised"),
        "mosquitto_pub said: {stderr}"
    );
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn certificate_from_another_ca_fails_the_handshake() {
    let site = Site::ward();
    let mut gw = site.start().await;
    // Another hospital's CA, with the same device names.
    let other = Site::ward_of("st-elsewhere");
    let tls = clients::tls_config(&site.ca(), &other.cert("pump-1"), &other.key("pump-1"));
    expect_tls_refused(&mut gw, "pump-1", tls, "UnknownIssuer").await;
    // A rogue CA that copies our CA's name exactly: the signature gives it away.
    let impostor = Site::ward_of("st-mary");
    let tls = clients::tls_config(
        &site.ca(),
        &impostor.cert("pump-1"),
        &impostor.key("pump-1"),
    );
    expect_tls_refused(&mut gw, "pump-1", tls, "BadSignature").await;
    assert_serving(&site, gw.port()).await;
}

/// Issue 12 (found by reading): peers that never show a device's certificate cannot grow
/// the audit log at their own pace. Each refusal is logged; per source and
/// `refusal_summary` interval (1 s here, default 60 s) one is audited in full and the rest
/// summarised with their count.
#[tokio::test]
async fn failed_handshakes_are_audited_once_per_source_and_interval_with_a_count() {
    let mut site = Site::ward();
    site.extra_edge = "refusal_summary = \"1s\"".into();
    let mut gw = site.start().await;
    let other = Site::ward_of("st-elsewhere");
    const N: usize = 40;
    for _ in 0..N {
        let tls = clients::tls_config(&site.ca(), &other.cert("pump-1"), &other.key("pump-1"));
        let (_client, eventloop) = AsyncClient::new(options("pump-1", gw.port(), tls), 8);
        expect_tls_refusal(eventloop).await;
    }
    gw.wait_count("edge.connect_refused", &["code=\"tls\""], N)
        .await;
    gw.wait_log("edge.connect_refused_repeated", &["peer=127.0.0.1"])
        .await;
    assert_serving(&site, gw.port()).await;
    gw.stop().await;
    let records = site.audit_records();
    let full = records
        .iter()
        .filter(|r| r["event"] == "edge.connect_refused" && r["device"].is_null())
        .count();
    let summarised: usize = records
        .iter()
        .filter(|r| r["event"] == "edge.connect_refused_repeated")
        .map(|r| {
            let detail = r["detail"].as_str().unwrap();
            detail
                .split_whitespace()
                .find_map(|w| w.strip_prefix("count="))
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(full + summarised, N, "every refusal accounted for");
    assert!(full < N / 4, "{full} of {N} refusals audited in full");
}

/// The site CA as an rcgen issuer, for certificates and CRLs `wardgate pki` will not make.
fn site_issuer(site: &Site) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let key = std::fs::read_to_string(site.pki().join("ca.key")).unwrap();
    let cert = std::fs::read_to_string(site.ca()).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&cert, rcgen::KeyPair::from_pem(&key).unwrap()).unwrap()
}

/// Issues `id` a certificate from the site CA valid only between the given offsets from now.
fn issue_with_validity(site: &Site, id: &str, from_days: i64, to_days: i64) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let issuer = site_issuer(site);
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, id);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(from_days);
    p.not_after = now + time::Duration::days(to_days);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(site.cert(id), cert.pem()).unwrap();
    std::fs::write(site.key(id), key.serialize_pem()).unwrap();
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_fail_the_handshake() {
    let mut site = Site::ward();
    site.register("old-pump", "infusion-pump", "127.0.0.1");
    site.register("future-pump", "infusion-pump", "127.0.0.1");
    issue_with_validity(&site, "old-pump", -30, -1);
    issue_with_validity(&site, "future-pump", 1, 30);
    let mut gw = site.start().await;
    for (id, why) in [
        ("old-pump", "certificate expired"),
        ("future-pump", "not valid before"),
    ] {
        expect_tls_refused(&mut gw, id, device_tls(&site, id), why).await;
    }
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn revoked_certificate_fails_the_handshake() {
    let site = Site::ward();
    site.revoke("pump-1");
    let mut gw = site.start().await;
    expect_tls_refused(&mut gw, "pump-1", device_tls(&site, "pump-1"), "Revoked").await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn crl_reload_closes_the_live_connection_and_refuses_the_next() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals", b"ok").await;

    site.revoke("pump-1");
    gw.signal("HUP");
    gw.wait_log("edge.tls_reloaded", &["crls=1", "closed=1"])
        .await;
    gw.wait_log("edge.connection_revoked", &["device=pump-1"])
        .await;
    // The revocation itself is named, with the device the PKI index says it belongs to.
    gw.wait_log("device.revoked", &["device=\"pump-1\"", "serial="])
        .await;
    assert_eq!(gw.events("device.revoked", &[]).len(), 1);
    pump.closed().await;

    expect_tls_refused(&mut gw, "pump-1", device_tls(&site, "pump-1"), "Revoked").await;
    assert_serving(&site, gw.port()).await;
}

/// Issue 12 (admission race): a certificate revoked between the TLS handshake and the
/// CONNECT gets no session. The connection is known to the reload from its handshake on,
/// and the CONNECT is judged under the material in force then.
#[tokio::test]
async fn a_certificate_revoked_before_its_connect_gets_no_session() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut raw = Raw::open(&site, "pump-1", gw.edge, None).await;
    site.revoke("pump-1");
    gw.signal("HUP");
    gw.wait_log("edge.tls_reloaded", &["crls=1"]).await;
    raw.send(&RawPacket::Connect(Connect::new("pump-1"))).await;
    match raw.recv().await {
        None => {}
        Some(RawPacket::ConnAck(a)) => assert_ne!(a.code, ConnectReturnCode::Success),
        Some(other) => panic!("unexpected {other:?}"),
    }
    assert!(gw.events("edge.connected", &["device=pump-1"]).is_empty());
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn unreadable_crl_on_reload_keeps_the_previous_one() {
    let site = Site::ward();
    let mut gw = site.start().await;
    std::fs::write(
        site.pki().join("crl.pem"),
        "-----BEGIN X509 CRL-----\n!!!\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_log("edge.tls_reload_failed", &["crl.pem"]).await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn client_id_other_than_the_certificate_is_refused_with_bad_client_id() {
    let site = Site::ward();
    let mut gw = site.start().await;
    // pump-1's certificate, pump-2's client id.
    let (_c, eventloop) =
        AsyncClient::new(options("pump-2", gw.port(), device_tls(&site, "pump-1")), 8);
    expect_connack_refusal(eventloop, ConnectReturnCode::BadClientId).await;
    gw.wait_log(
        "edge.connect_refused",
        &["device=\"pump-1\"", "code=\"client_id_mismatch\""],
    )
    .await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn acl_violating_publish_disconnects_and_is_not_delivered() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    // pump-1 forges an alarm in pump-2's name.
    clients::forge_publish(&site, "pump-1", gw.port(), "ward/pump-2/alarm/forged").await;
    gw.wait_log(
        "edge.acl_violation",
        &[
            "device=pump-1",
            "code=\"publish_denied\"",
            "ward/pump-2/alarm/forged",
        ],
    )
    .await;
    // The next alarm the nurse sees is a genuine one, not the forgery.
    let mut pump2 = Client::connect(&site, "pump-2", gw.port()).await;
    pump2.publish("ward/pump-2/alarm/real", b"r").await;
    assert_eq!(nurse.next_publish().await.topic, "ward/pump-2/alarm/real");
}

/// Issue 15, item 5: a filter outside the ACL is refused with SUBACK 0x80, in its place
/// among the others (MQTT-3.9.3-1); the session goes on, the filters allowed work, and
/// each refusal is audited as an ACL violation.
#[tokio::test]
async fn acl_violating_subscribe_is_refused_with_suback_0x80_and_the_session_kept() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.client
        .subscribe("ward/+/alarm/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    match pump.next_ack().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.return_codes, [SubscribeReasonCode::Failure]),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
    gw.wait_log(
        "edge.acl_violation",
        &["device=pump-1", "code=\"subscribe_denied\""],
    )
    .await;
    // Still connected: its next PUBLISH is acknowledged.
    pump.publish("ward/pump-1/vitals/rate", b"5").await;
    // A nurse display's grant covers narrower filters, not wider ones.
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse
        .client
        .subscribe_many([
            SubscribeFilter::new("ward/pump-2/alarm/#".into(), QoS::AtLeastOnce),
            SubscribeFilter::new("ward/#".into(), QoS::AtLeastOnce),
            SubscribeFilter::new("ward/pump-1/alarm/#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    match nurse.next_ack().await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtMostOnce),
            ]
        ),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
    gw.wait_log("edge.acl_violation", &["device=nurse-1", "\"ward/#\""])
        .await;
    let mut pump2 = Client::connect(&site, "pump-2", gw.port()).await;
    pump2.publish("ward/pump-2/alarm/real", b"r").await;
    assert_eq!(nurse.next_publish().await.topic, "ward/pump-2/alarm/real");
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn wildcard_in_a_publish_topic_is_a_protocol_violation() {
    let site = Site::ward();
    let mut gw = site.start().await;
    // rumqttc refuses to send this; the raw client does.
    let publish = Publish::new("ward/pump-1/#", QoS::AtMostOnce, "x");
    let parts = ["device=pump-1", "code=\"wildcard_publish\""];
    let event = "edge.protocol_violation";
    expect_disconnect_for(
        &site,
        &mut gw,
        "pump-1",
        RawPacket::Publish(publish),
        event,
        &parts,
    )
    .await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn oversized_payload_disconnects() {
    let site = Site::ward(); // infusion pumps: max_payload 1KiB
    let mut gw = site.start().await;
    // Just over the class limit: read, measured, refused.
    let mut raw = Raw::connect(&site, "pump-1", gw.edge).await;
    let mut publish = Publish::new("ward/pump-1/vitals", QoS::AtLeastOnce, vec![b'x'; 1025]);
    publish.pkid = 1;
    raw.send(&RawPacket::Publish(publish)).await;
    raw.expect_closed().await;
    gw.wait_log(
        "edge.oversized_packet",
        &["device=pump-1", "1025 bytes exceeds the limit of 1024"],
    )
    .await;
    // Announcing 200 MB: refused from the fixed header, before any of it is read.
    let mut raw = Raw::connect(&site, "pump-2", gw.edge).await;
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x80, 0x60]).await;
    raw.expect_closed().await;
    gw.wait_log(
        "edge.oversized_packet",
        &["device=pump-2", "201326592 bytes"],
    )
    .await;
    // Exactly at the limit is fine.
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals", &[b'y'; 1024]).await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn second_connect_and_server_packets_are_protocol_violations() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let connect = RawPacket::Connect(Connect::new("pump-1"));
    let event = "edge.protocol_violation";
    expect_disconnect_for(
        &site,
        &mut gw,
        "pump-1",
        connect,
        event,
        &["second CONNECT"],
    )
    .await;
    let parts = ["server-to-client packet"];
    expect_disconnect_for(&site, &mut gw, "pump-2", RawPacket::PingResp, event, &parts).await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn stalled_handshake_does_not_delay_other_devices() {
    let mut site = Site::ward();
    site.extra_edge = "handshake_timeout = \"2s\"".into();
    let mut gw = site.start().await;
    // A client that opens TCP and never speaks TLS.
    let stalled = tokio::net::TcpStream::connect(gw.edge).await.unwrap();
    // Others connect and exchange messages meanwhile.
    assert_serving(&site, gw.port()).await;
    assert!(gw
        .events("edge.connect_refused", &["handshake_timeout"])
        .is_empty());
    gw.wait_log("edge.connect_refused", &["code=\"handshake_timeout\""])
        .await;
    drop(stalled);
}

#[tokio::test]
async fn device_connecting_from_another_address_is_refused() {
    let mut site = Site::ward();
    site.register("pump-9", "infusion-pump", "127.0.0.9");
    let mut gw = site.start().await;
    let (_c, eventloop) =
        AsyncClient::new(options("pump-9", gw.port(), device_tls(&site, "pump-9")), 8);
    expect_connack_refusal(eventloop, ConnectReturnCode::NotAuthorized).await;
    gw.wait_log(
        "edge.connect_refused",
        &["device=\"pump-9\"", "code=\"address_mismatch\""],
    )
    .await;
    // From its registered address it gets in.
    let mut raw = Raw::open(
        &site,
        "pump-9",
        gw.edge,
        Some("127.0.0.9".parse::<IpAddr>().unwrap()),
    )
    .await;
    raw.send(&RawPacket::Connect(Connect::new("pump-9"))).await;
    match raw.recv().await {
        Some(RawPacket::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn last_will_outside_the_acl_is_refused() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut raw = Raw::open(&site, "pump-1", gw.edge, None).await;
    let mut connect = Connect::new("pump-1");
    connect.last_will = Some(LastWill {
        topic: "ward/pump-2/alarm/gone".into(),
        message: Bytes::from_static(b"forged"),
        qos: QoS::AtLeastOnce,
        retain: false,
    });
    raw.send(&RawPacket::Connect(connect)).await;
    match raw.recv().await {
        Some(RawPacket::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
        other => panic!("{other:?}"),
    }
    gw.wait_log("edge.connect_refused", &["code=\"will_not_allowed\""])
        .await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn subscribe_with_an_invalid_filter_is_a_protocol_violation() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let subscribe = RawPacket::Subscribe(Subscribe::new("ward/#/alarm", QoS::AtMostOnce));
    let parts = ["device=nurse-1", "code=\"invalid_topic\""];
    expect_disconnect_for(
        &site,
        &mut gw,
        "nurse-1",
        subscribe,
        "edge.protocol_violation",
        &parts,
    )
    .await;
    assert_serving(&site, gw.port()).await;
}

/// Signs a client certificate with the site CA through the openssl command line, with a
/// subject rcgen will not produce.
fn openssl_client_cert(site: &Site, name: &str, subject: &str) {
    require("openssl", "openssl");
    let key = site.key(name);
    let csr = site.path(&format!("devices/{name}.csr"));
    let ext = site.path("client-ext.cnf");
    std::fs::write(&ext, "extendedKeyUsage = clientAuth\n").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        key.to_str().unwrap(),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        subject,
        "-multivalue-rdn",
        "-out",
        csr.to_str().unwrap(),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        site.ca().to_str().unwrap(),
        "-CAkey",
        site.pki().join("ca.key").to_str().unwrap(),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        site.cert(name).to_str().unwrap(),
    ]);
}

#[tokio::test]
async fn hostile_certificate_names_are_refused() {
    let site = Site::ward();
    openssl_client_cert(&site, "two-names", "/CN=pump-1/CN=pump-2");
    openssl_client_cert(&site, "wildcard-name", "/CN=ward\\/#");
    openssl_client_cert(&site, "no-name", "/O=st-mary");
    let mut gw = site.start().await;
    for name in ["two-names", "wildcard-name", "no-name"] {
        let mut raw = Raw::open(&site, name, gw.edge, None).await;
        raw.send(&RawPacket::Connect(Connect::new("pump-1"))).await;
        assert!(
            raw.recv().await.is_none(),
            "{name}: expected the gateway to close"
        );
    }
    gw.wait_log(
        "edge.connect_refused",
        &["code=\"bad_certificate\"", "more than one common name"],
    )
    .await;
    gw.wait_log(
        "edge.connect_refused",
        &["code=\"bad_certificate\"", "not a valid device id"],
    )
    .await;
    gw.wait_log(
        "edge.connect_refused",
        &["code=\"bad_certificate\"", "no common name"],
    )
    .await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn sigterm_stops_the_gateway_with_sessions_open() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals", b"ok").await;
    let status = gw.stop().await;
    assert!(status.success(), "{status:?}");
    pump.closed().await;
}

#[tokio::test]
async fn silent_client_after_the_handshake_is_dropped() {
    let mut site = Site::ward();
    site.extra_edge = "connect_timeout = \"1s\"".into();
    let mut gw = site.start().await;
    let mut raw = Raw::open(&site, "pump-1", gw.edge, None).await;
    raw.expect_closed().await;
    gw.wait_log(
        "edge.connect_refused",
        &["device=\"pump-1\"", "code=\"connect_timeout\""],
    )
    .await;
}

#[tokio::test]
async fn qos2_passes_through_to_a_granted_subscriber() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse
        .subscribe_qos("ward/+/alarm/#", QoS::ExactlyOnce)
        .await;
    let pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.client
        .publish(
            "ward/pump-1/alarm/qos2",
            QoS::ExactlyOnce,
            false,
            b"exactly-once".to_vec(),
        )
        .await
        .unwrap();
    let got = nurse.next_publish().await;
    assert_eq!(got.qos, QoS::ExactlyOnce);
    assert_eq!(&got.payload[..], b"exactly-once");
}

/// A CONNECT frame for `protocol` at `level`, clean session, keep-alive 30 s, client id
/// `pump-1`; MQTT 5 frames carry an empty property list.
fn connect_frame(protocol: &str, level: u8) -> Vec<u8> {
    let mut body = vec![0, protocol.len() as u8];
    body.extend_from_slice(protocol.as_bytes());
    body.extend_from_slice(&[level, 0x02, 0, 30]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, 6]);
    body.extend_from_slice(b"pump-1");
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

#[tokio::test]
async fn other_protocol_versions_are_refused_in_their_own_terms() {
    let site = Site::ward();
    let mut gw = site.start().await;
    for (protocol, level, reply) in [
        // A level no MQTT has (5 is served, see `mqtt5.rs`): CONNACK 0x01.
        ("MQTT", 6, &[0x20, 0x02, 0x00, 0x01][..]),
        // MQTT 3.1: CONNACK 0x01 (unacceptable protocol version).
        ("MQIsdp", 3, &[0x20, 0x02, 0x00, 0x01][..]),
    ] {
        let mut raw = Raw::open(&site, "pump-1", gw.edge, None).await;
        raw.send_bytes(&connect_frame(protocol, level)).await;
        assert_eq!(raw.read_to_close().await, reply, "{protocol} level {level}");
        let detail = format!("{protocol:?} level {level}");
        gw.wait_log(
            "edge.connect_refused",
            &["code=\"unsupported_protocol\"", &detail],
        )
        .await;
    }
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn stale_crl_is_used_with_a_warning() {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, SerialNumber};
    let site = Site::ward();
    // A CRL whose nextUpdate passed yesterday, signed by the site CA.
    let issuer = site_issuer(&site);
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now - time::Duration::days(30),
        next_update: now - time::Duration::days(1),
        crl_number: SerialNumber::from(99u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    std::fs::write(site.pki().join("crl.pem"), crl.pem().unwrap()).unwrap();
    let mut gw = site.start().await;
    gw.wait_log("edge.crl_stale", &["crl.pem"]).await;
    assert_serving(&site, gw.port()).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let mut site = Site::ward();
    site.extra_edge = "max_connections = 2".into();
    let mut gw = site.start().await;
    let held: Vec<_> = open_silent(gw.edge, 2).await;
    let mut third = tokio::net::TcpStream::connect(gw.edge).await.unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, third.read(&mut byte))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "third connection should be closed: {n:?}"
    );
    gw.wait_log("edge.connect_refused", &["code=\"too_many_connections\""])
        .await;
    drop(held);
}

/// Opens `n` TCP connections that never speak TLS.
async fn open_silent(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    v
}
