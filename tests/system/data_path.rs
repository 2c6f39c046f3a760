//! The data path under stress (issue 12): no single device, record or crash may stop,
//! starve or exhaust the gateway. Each test is named after the promise it protects and
//! runs against a real mosquitto upstream and real clients.

use rumqttc::mqttbytes::v4::{
    Connect, LastWill, Packet as RawPacket, PubRel, Publish, Subscribe, SubscribeFilter,
    Unsubscribe,
};
use rumqttc::{ConnectReturnCode, QoS};

use crate::support::clients::{Client, Raw};
use crate::support::upstream::{property, Consumer, Link, Upstream};
use crate::support::{require, Gateway, Site};

/// The upstream's ACL: the gateway may write alarms, vitals, status and its own stream,
/// and read everything (its command subscription); `…/forbidden/…` is refused (PUBACK
/// 0x87 to an MQTT 5 client). The consumer reads everything.
const UPSTREAM_ACL: &str = "user gw-test\n\
     topic read hospital/#\n\
     topic write hospital/st-mary/gw-test/+/alarm/#\n\
     topic write hospital/st-mary/gw-test/+/vitals/#\n\
     topic write hospital/st-mary/gw-test/+/status/#\n\
     topic write hospital/st-mary/gw-test/_gateway/#\n\
     \n\
     user hospital-consumer\n\
     topic read hospital/#\n";

/// The ward's gateway forwarding to a mosquitto upstream that enforces [`UPSTREAM_ACL`]
/// (`extra` added to its `[uplink]`), commands subscribed, and a consumer reading
/// everything upstream. The upstream runs as long as the value returned for it lives.
async fn ward_with_hospital(extra: &str) -> (Site, Upstream, Consumer, Gateway) {
    let mut site = Site::ward();
    let upstream = Upstream::start_with_acl(&site.path("upstream"), "gw-test", UPSTREAM_ACL).await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, extra);
    let consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;
    (site, upstream, consumer, gw)
}

/// Issue 12, item 2: a record the upstream refuses leaves the in-flight window at once; it
/// is set aside (counted, audited, visible to the engineer) and never holds back what
/// follows it — here an alarm behind more refused records than the window holds.
#[tokio::test]
async fn records_refused_upstream_never_block_the_records_behind_them() {
    let (site, _upstream, mut consumer, mut gw) = ward_with_hospital("inflight = 2").await;

    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    const REFUSED: usize = 5;
    for i in 0..REFUSED {
        pump.publish(&format!("ward/pump-1/forbidden/{i}"), b"x")
            .await;
    }
    pump.publish("ward/pump-1/alarm/occlusion", b"occluded")
        .await;

    let got = consumer.next().await;
    assert_eq!(
        &got.topic[..],
        b"hospital/st-mary/gw-test/pump-1/alarm/occlusion"
    );
    assert_eq!(property(&got, "wardgate-priority"), Some("alarm"));
    gw.wait_count("spool.rejected", &["pump-1"], REFUSED).await;
    let counters = &site.device_json("pump-1")["counters"];
    assert_eq!(counters["rejected"], REFUSED, "{counters}");
    let status = site.admin_ok(&["status"]);
    assert!(
        status.contains(&format!("{REFUSED} rejected upstream")),
        "{status}"
    );
    // The uplink keeps going: a later record arrives too.
    pump.publish("ward/pump-1/vitals/hr", b"72").await;
    assert_eq!(
        &consumer.next().await.topic[..],
        b"hospital/st-mary/gw-test/pump-1/vitals/hr"
    );
    gw.stop().await;
    assert_eq!(site.audit_count("spool.rejected", "pump-1"), REFUSED);
}

/// Issue 12, item 3: a record whose upstream topic would not fit MQTT's 65,535-byte limit
/// is set aside by the uplink instead of being sent (and resent every session), so the
/// alarm behind it arrives; and the edge refuses such a topic from a device in the first
/// place. The record gets into the spool under a shorter `topic_prefix`, then the gateway
/// restarts with a longer one.
#[tokio::test]
async fn a_record_too_long_for_the_upstream_never_blocks_the_alarm_behind_it() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, false).await;
    let long_prefix = upstream.uplink_section("gw-test", link.port, "");
    site.extra = long_prefix.replace("topic_prefix = \"hospital\"", "topic_prefix = \"h\"");
    assert_ne!(site.extra, long_prefix);
    // "ward/pump-1/" + rest: 65,520 bytes, a valid topic; "h/st-mary/gw-test/pump-1/" +
    // rest fits in 65,535 bytes, "hospital/st-mary/gw-test/pump-1/" + rest does not.
    let long = format!("ward/pump-1/alarm/{}", "x".repeat(65_502));
    assert_eq!(long.len(), 65_520);
    let config = site.write_config();
    {
        let gw = Gateway::start(&config).await;
        let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
        pump.publish(&long, b"too long upstream").await;
        pump.publish("ward/pump-1/alarm/occlusion", b"occluded")
            .await;
        gw.stop().await;
    }

    site.extra = long_prefix;
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    link.set_up(true);
    let got = consumer.next().await;
    assert_eq!(
        &got.topic[..],
        b"hospital/st-mary/gw-test/pump-1/alarm/occlusion"
    );
    gw.wait_log("spool.rejected", &["pump-1", "upstream topic"])
        .await;
    assert_eq!(site.device_json("pump-1")["counters"]["rejected"], 1);

    // Under this prefix the edge refuses the topic outright, and says why.
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.client
        .publish(&long, QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    pump.closed().await;
    gw.wait_log(
        "edge.protocol_violation",
        &["pump-1", "invalid_topic", "upstream"],
    )
    .await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/alarm/again", b"1").await;
    assert_eq!(
        &consumer.next().await.topic[..],
        b"hospital/st-mary/gw-test/pump-1/alarm/again"
    );
}

/// Issue 12, item 9: a device publish that would map into the upstream command space
/// (`ward/{device}/cmd/…` → `…/{device}/cmd/…`) is refused at the edge as an ACL violation,
/// so it can never come back down through the uplink's command subscription as a command;
/// real commands from the hospital still arrive, and only they are audited as delivered.
#[tokio::test]
async fn a_device_cannot_forge_commands_through_the_upstream() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let hospital = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;

    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.client
        .publish(
            "ward/pump-1/cmd/bolus",
            QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
    pump.closed().await;
    gw.wait_log(
        "edge.acl_violation",
        &["pump-1", "publish_denied", "cmd/bolus"],
    )
    .await;

    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.subscribe("ward/pump-1/cmd/#").await;
    hospital
        .client
        .publish(
            "hospital/st-mary/gw-test/pump-1/cmd/rate",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"real".to_vec(),
        )
        .await
        .unwrap();
    let got = pump.next_publish().await;
    assert_eq!(&got.topic[..], "ward/pump-1/cmd/rate");
    assert_eq!(&got.payload[..], b"real");
    gw.stop().await;
    assert_eq!(site.audit_count("uplink.command_delivered", "pump-1"), 1);
}

/// Issue 12, item 7: what the upstream has seen is durable here first. An audit record is
/// forwarded only once it is on disk in the local log, and a spool record only once a group
/// commit covers it, so a `kill -9` right after the upstream received them never makes the
/// restarted gateway give the same audit index, or the same sequence number, to another
/// record (a fork in the chain, or a "duplicate" the upstream would drop).
#[tokio::test]
async fn a_crash_right_after_forwarding_never_reuses_an_index_or_a_sequence_number() {
    let mut site = Site::ward();
    site.issue("stranger-1");
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let mut consumer = upstream.consumer_with_audit("hospital/#").await;
    let config = site.write_config();
    let mut seen = Seen::default();
    for round in 0..4 {
        let gw = Gateway::start(&config).await;
        let pump = Client::connect(&site, "pump-1", gw.port()).await;
        let payload = format!("round-{round}");
        pump.client
            .publish(
                "ward/pump-1/status",
                QoS::AtMostOnce,
                false,
                payload.clone().into_bytes(),
            )
            .await
            .unwrap();
        // A fresh audit record: the stranger's refusal. Killed the moment both arrived.
        let (_c, el) = rumqttc::AsyncClient::new(
            crate::support::clients::options(
                "stranger-1",
                gw.port(),
                crate::support::clients::device_tls(&site, "stranger-1"),
            ),
            8,
        );
        crate::support::clients::expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
        let mut seen_payload = false;
        while seen.refusals.len() <= round || !seen_payload {
            let p = consumer.next().await;
            seen.note(&p);
            seen_payload |= p.payload == payload.as_bytes();
        }
        gw.kill9().await;
    }
    // The last run's records (its start among them) come through too, none reusing an index.
    let mut gw = Gateway::start(&config).await;
    gw.wait_log("uplink.connected", &[]).await;
    let out = site.admin_ok(&["audit", "tail", "-n", "1", "--json"]);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let records = last["index"].as_u64().unwrap() + 1;
    while (seen.chain.len() as u64) < records {
        seen.note(&consumer.next().await);
    }
    assert_eq!(seen.seqs.len(), 4, "{:?}", seen.seqs);
}

/// What the upstream has seen: index → hash of every audit record, seq → payload of every
/// device record; a second, different record under either is a failure.
#[derive(Default)]
struct Seen {
    chain: std::collections::BTreeMap<u64, String>,
    seqs: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Indexes of the stranger's refusals.
    refusals: std::collections::BTreeSet<u64>,
}

impl Seen {
    fn note(&mut self, p: &rumqttc::v5::mqttbytes::v5::Publish) {
        if p.topic.ends_with(b"/_gateway/audit") {
            let e: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            let index = e["index"].as_u64().unwrap();
            let hash = e["hash"].as_str().unwrap().to_owned();
            let known = self.chain.entry(index).or_insert_with(|| hash.clone());
            assert_eq!(
                *known, hash,
                "audit index {index} reused for another record: {e}"
            );
            if e["event"] == "edge.connect_refused" && e["device"] == "stranger-1" {
                self.refusals.insert(index);
            }
        } else {
            let seq: u64 = property(p, "wardgate-seq").unwrap().parse().unwrap();
            let known = self.seqs.entry(seq).or_insert_with(|| p.payload.to_vec());
            assert_eq!(known, &p.payload[..], "sequence number {seq} reused");
        }
    }
}

/// Connects `device` with the raw client and a CONNECT of the given clean-session flag.
async fn raw_session(site: &Site, gw: &Gateway, device: &str, clean: bool) -> Raw {
    let mut connect = Connect::new(device);
    connect.clean_session = clean;
    Raw::connect_with(site, gw.edge, connect).await.0
}

/// One SUBSCRIBE of `n` distinct filters under pump-1's command space, from `first`.
fn subscribe(pkid: u16, first: usize, n: usize) -> RawPacket {
    let mut s = Subscribe::new_many(
        (first..first + n)
            .map(|i| SubscribeFilter::new(format!("ward/pump-1/cmd/f{i}"), QoS::AtLeastOnce)),
    );
    s.pkid = pkid;
    RawPacket::Subscribe(s)
}

/// Sends `packet` and expects its SUBACK.
async fn expect_suback(raw: &mut Raw, packet: RawPacket) {
    raw.send(&packet).await;
    match raw.recv().await {
        Some(RawPacket::SubAck(_)) => {}
        other => panic!("expected a SUBACK, got {other:?}"),
    }
}

/// Issue 12, item 1: one device cannot grow the broker's state without bound by
/// subscribing. The embedded broker keeps state for every distinct filter it has seen until
/// the gateway restarts, so the class's `max_subscriptions` (default 16) caps the distinct
/// filters a device subscribes to since start — across connections and clean sessions, and
/// an UNSUBSCRIBE frees no room. Beyond it the device is disconnected for a violation
/// (audited, counted, a quarantine strike), and the issue's probe — 20,000 distinct filters
/// in 40 SUBSCRIBE packets — leaves the gateway's memory where it was. (Quarantine after
/// `acl_violations` strikes is raised out of the way, so that the cap alone bounds it.)
#[tokio::test]
async fn a_subscription_flood_cannot_exhaust_the_gateway() {
    let mut site = Site::ward();
    site.extra = "[policy]\nacl_violations = 1000\n".into();
    let mut gw = site.start().await;
    let rss_before = gw.rss_kib();

    // 16 filters in two packets fit, and the same again is free; a 17th does not.
    let mut raw = raw_session(&site, &gw, "pump-1", true).await;
    expect_suback(&mut raw, subscribe(1, 0, 8)).await;
    expect_suback(&mut raw, subscribe(2, 8, 8)).await;
    expect_suback(&mut raw, subscribe(3, 0, 16)).await;
    let mut unsubscribe = Unsubscribe::new("ward/pump-1/cmd/f0");
    unsubscribe.pkid = 4;
    raw.send(&RawPacket::Unsubscribe(unsubscribe)).await;
    assert!(matches!(raw.recv().await, Some(RawPacket::UnsubAck(_))));
    raw.send(&subscribe(5, 16, 1)).await;
    raw.expect_closed().await;
    gw.wait_log(
        "edge.subscription_limit",
        &["device=pump-1", "code=\"too_many_subscriptions\""],
    )
    .await;

    // A new connection with a clean session has no more room: the broker still holds
    // what the last one asked for. Its known filters remain free.
    let mut raw = raw_session(&site, &gw, "pump-1", true).await;
    expect_suback(&mut raw, subscribe(1, 0, 16)).await;
    raw.send(&subscribe(2, 16, 1)).await;
    raw.expect_closed().await;

    // The issue's probe: 40 SUBSCRIBE packets of 500 new filters each, sent at once.
    let mut raw = raw_session(&site, &gw, "pump-1", true).await;
    for i in 0..40 {
        raw.send(&subscribe(i + 1, 1000 + usize::from(i) * 500, 500))
            .await;
    }
    raw.expect_closed().await;
    gw.wait_count("edge.subscription_limit", &["device=pump-1"], 3)
        .await;
    let rss_after = gw.rss_kib();
    println!("gateway RSS before the flood {rss_before} KiB, after {rss_after} KiB");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew by {} KiB",
        rss_after - rss_before
    );

    // Everyone else is served, and so are pump-1's commands within its limit.
    crate::edge::assert_serving(&site, gw.port()).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.subscribe("ward/pump-1/cmd/f3").await;

    let shown = site.device_json("pump-1");
    assert_eq!(shown["counters"]["subscription_limit"], 3, "{shown}");
    drop(pump);
    gw.stop().await;
    assert_eq!(site.audit_count("edge.subscription_limit", "pump-1"), 3);
}

/// Issue 12, item 1: SUBSCRIBE and UNSUBSCRIBE count against the class's rate like
/// PUBLISH, so a device cannot churn the broker's subscription state at any speed.
#[tokio::test]
async fn subscribe_and_unsubscribe_count_against_the_rate() {
    let mut site = Site::ward();
    site.classes[0].extra = "messages_per_sec = 5\nburst = \"1s\"";
    let mut gw = site.start().await;
    let mut raw = raw_session(&site, &gw, "pump-1", true).await;
    for i in 0..6u16 {
        raw.send(&subscribe(2 * i + 1, 0, 1)).await;
        let mut u = Unsubscribe::new("ward/pump-1/cmd/f0");
        u.pkid = 2 * i + 2;
        raw.send(&RawPacket::Unsubscribe(u)).await;
    }
    gw.wait_log("edge.throttled", &["device=pump-1"]).await;
    // Nothing is dropped: every one is answered, in order, just later.
    for i in 0..6u16 {
        match raw.recv().await {
            Some(RawPacket::SubAck(a)) => assert_eq!(a.pkid, 2 * i + 1),
            other => panic!("expected SUBACK {}, got {other:?}", 2 * i + 1),
        }
        match raw.recv().await {
            Some(RawPacket::UnsubAck(a)) => assert_eq!(a.pkid, 2 * i + 2),
            other => panic!("expected UNSUBACK {}, got {other:?}", 2 * i + 2),
        }
    }
    let shown = site.device_json("pump-1");
    assert!(
        shown["counters"]["throttled"].as_u64().unwrap() > 0,
        "{shown}"
    );
}

/// Connects `device` with the raw client and a last will on `topic`.
async fn raw_with_will(site: &Site, gw: &Gateway, device: &str, topic: &str) -> Raw {
    let mut connect = Connect::new(device);
    connect.last_will = Some(LastWill::new(
        topic,
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    Raw::connect_with(site, gw.edge, connect).await.0
}

/// Issue 12, item 8: a device's last will reaches the hospital, not just local
/// subscribers. It is stored (encrypted) at CONNECT but not forwarded while the device is
/// connected; a connection that ends without DISCONNECT releases it upstream, a clean
/// DISCONNECT deletes it, and so does a gateway crash (the device did not fail: it will
/// reconnect with its will).
#[tokio::test]
async fn a_failed_devices_last_will_reaches_the_hospital() {
    let (site, _upstream, mut consumer, mut gw) = ward_with_hospital("").await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;

    // Held while the pump is connected: what it publishes after CONNECT arrives first.
    let mut pump = raw_with_will(&site, &gw, "pump-1", "ward/pump-1/alarm/offline").await;
    let mut alarm = Publish::new("ward/pump-1/alarm/online", QoS::AtLeastOnce, b"up".to_vec());
    alarm.pkid = 1;
    pump.send(&RawPacket::Publish(alarm)).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubAck(_))));
    let up = "hospital/st-mary/gw-test/pump-1/alarm";
    assert_eq!(
        consumer.next().await.topic,
        format!("{up}/online").as_bytes()
    );
    assert_eq!(nurse.next_publish().await.topic, "ward/pump-1/alarm/online");

    // The pump's connection dies: its will reaches the hospital and the local display.
    drop(pump);
    let will = consumer.next().await;
    assert_eq!(will.topic, format!("{up}/offline").as_bytes());
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(property(&will, "wardgate-priority"), Some("alarm"));
    assert_eq!(
        nurse.next_publish().await.topic,
        "ward/pump-1/alarm/offline"
    );
    gw.wait_log("edge.will_released", &["device=pump-1"]).await;

    // A clean DISCONNECT deletes the will: the next record upstream is pump-2's marker.
    let mut pump2 = raw_with_will(&site, &gw, "pump-2", "ward/pump-2/alarm/offline").await;
    pump2.send(&RawPacket::Disconnect).await;
    pump2.expect_closed().await;
    gw.wait_log("edge.disconnected", &["device=pump-2", "DISCONNECT"])
        .await;
    let mut pump2 = Client::connect(&site, "pump-2", gw.port()).await;
    pump2.publish("ward/pump-2/alarm/marker", b"m").await;
    assert_eq!(
        consumer.next().await.topic,
        "hospital/st-mary/gw-test/pump-2/alarm/marker".as_bytes()
    );
    drop(pump2);

    // A gateway crash with a will held: the restarted gateway deletes it, never sends it.
    let _pump = raw_with_will(&site, &gw, "pump-1", "ward/pump-1/alarm/offline").await;
    gw.kill9().await;
    let mut gw = site.start().await;
    gw.wait_log("spool.wills_dropped", &["count=1"]).await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/alarm/marker", b"m").await;
    assert_eq!(
        consumer.next().await.topic,
        format!("{up}/marker").as_bytes()
    );
}

/// mosquitto_pub straight to the embedded broker (no TLS, as any local user could);
/// `Some(stderr)` if it failed.
fn local_pub(broker: std::net::SocketAddr, args: &[&str]) -> Option<String> {
    require("mosquitto_pub", "mosquitto-clients");
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-q", "1"])
        .args(args)
        .output()
        .expect("run mosquitto_pub");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Issue 12, item 5: the embedded broker's port admits only the gateway's own clients and
/// its update agent, with credentials made at this start — whatever `[firewall]` says.
/// A local user cannot command a pump, read vitals or forge an update report there; each
/// refusal is audited (aggregated: one record per minute with the count of the others).
#[tokio::test]
async fn only_the_gateway_and_its_agent_may_use_the_embedded_broker() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.subscribe("ward/pump-1/cmd/#").await;
    let broker = gw.broker;
    let pub_as = |who: &[&str], what: &[&str]| -> Option<String> {
        let args: Vec<&str> = who.iter().chain(what).copied().collect();
        local_pub(broker, &args)
    };

    // No credentials, a guessed password: refused. Neither a command to the pump nor a
    // forged update report gets in.
    let command = ["-t", "ward/pump-1/cmd/rate", "-m", "999"];
    let forged = [
        "-t",
        "_gateway/update/status",
        "-m",
        r#"{"event":"committed"}"#,
    ];
    for who in [
        &["-i", "intruder"][..],
        &["-i", "intruder", "-u", "_wardgate", "-P", "guess"],
    ] {
        assert!(pub_as(who, &command).is_some(), "{who:?} was let in");
        assert!(pub_as(who, &forged).is_some(), "{who:?} forged a report");
    }
    gw.wait_log("broker.auth_refused", &["client_id=\"intruder\""])
        .await;

    // The agent's credentials (made at this start, beside the admin socket) with a guessed
    // password, or under a device's client id (a session takeover): refused.
    let creds = std::fs::read_to_string(site.path("admin/broker-agent.secret"))
        .expect("the agent's credentials beside the admin socket");
    let (user, password) = creds.trim_end().split_once(':').unwrap();
    assert_eq!(user, "_wardgate-agent");
    for who in [
        &["-i", "intruder", "-u", user, "-P", "guess"][..],
        &["-i", "pump-1", "-u", user, "-P", password],
    ] {
        assert!(pub_as(who, &command).is_some(), "{who:?} was let in");
    }

    // The agent, with its credentials and a `_` client id, gets in.
    let agent = ["-i", "_agent-probe", "-u", user, "-P", password];
    assert_eq!(pub_as(&agent, &forged), None);
    gw.wait_log("update.committed", &[]).await;

    // The pump got none of the refused commands: the first to reach it is one sent with
    // the agent's credentials.
    let marker = ["-t", "ward/pump-1/cmd/marker", "-m", "ok"];
    assert_eq!(pub_as(&agent, &marker), None);
    assert_eq!(pump.next_publish().await.topic, "ward/pump-1/cmd/marker");
    crate::edge::assert_serving(&site, gw.port()).await;
    drop(pump);
    gw.stop().await;
    let refused: Vec<_> = site
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "broker.auth_refused")
        .collect();
    assert!(!refused.is_empty());
    assert!(
        refused.len() < 6,
        "six refusals within a minute are aggregated: {refused:?}"
    );
}

/// Opens a persistent session (clean session 0) for `device`; returns the client and
/// whether the broker resumed a session (CONNACK session present).
async fn persistent_session(site: &Site, gw: &Gateway, device: &str) -> (Raw, bool) {
    let mut connect = Connect::new(device);
    connect.clean_session = false;
    Raw::connect_with(site, gw.edge, connect).await
}

/// Issue 12, item 6: a persistent broker session cannot outlive the rights it was opened
/// under. A nurse display removed and added again as a pump (which may read only its own
/// commands) gets no session back: neither its old subscription to every alarm nor the
/// alarms queued for it meanwhile. A device whose rights did not change resumes its
/// session as before.
#[tokio::test]
async fn a_class_change_ends_the_persistent_session_of_the_old_class() {
    let site = Site::ward();
    let mut gw = site.start().await;
    let (mut nurse, resumed) = persistent_session(&site, &gw, "nurse-1").await;
    assert!(!resumed);
    expect_suback(
        &mut nurse,
        RawPacket::Subscribe(Subscribe::new("ward/+/alarm/#", QoS::AtLeastOnce)),
    )
    .await;
    drop(nurse);
    gw.wait_log("edge.disconnected", &["device=nurse-1"]).await;

    // Unchanged rights: the session is resumed.
    let (nurse, resumed) = persistent_session(&site, &gw, "nurse-1").await;
    assert!(
        resumed,
        "a device whose class did not change keeps its session"
    );
    drop(nurse);
    gw.wait_count("edge.disconnected", &["device=nurse-1"], 2)
        .await;

    site.admin_ok(&["device", "remove", "nurse-1"]);
    let add = [
        "device",
        "add",
        "nurse-1",
        "--class",
        "infusion-pump",
        "--address",
        "127.0.0.1",
    ];
    site.admin_ok(&add);
    // An alarm while it is away would be queued for the old session.
    let mut pump = Client::connect(&site, "pump-2", gw.port()).await;
    pump.publish("ward/pump-2/alarm/occlusion", b"occluded")
        .await;

    let (mut nurse, resumed) = persistent_session(&site, &gw, "nurse-1").await;
    assert!(!resumed, "the session of the old class is gone");
    gw.wait_log(
        "edge.session_purged",
        &["device=nurse-1", "class=\"infusion-pump\""],
    )
    .await;
    // Nothing of the old session is delivered: the first packet after CONNACK answers the
    // device's own SUBSCRIBE.
    let mut own = Subscribe::new("ward/nurse-1/cmd/#", QoS::AtLeastOnce);
    own.pkid = 7;
    expect_suback(&mut nurse, RawPacket::Subscribe(own)).await;
    pump.publish("ward/pump-2/alarm/occlusion", b"again").await;
    // A command for it (sent with the agent's credentials) is the first PUBLISH it gets:
    // the alarm published before it did not reach it.
    let creds = std::fs::read_to_string(site.path("admin/broker-agent.secret")).unwrap();
    let (user, password) = creds.trim_end().split_once(':').unwrap();
    let marker = [
        "-i",
        "_probe",
        "-u",
        user,
        "-P",
        password,
        "-t",
        "ward/nurse-1/cmd/x",
        "-m",
        "m",
    ];
    assert_eq!(local_pub(gw.broker, &marker), None);
    match nurse.recv().await {
        Some(RawPacket::Publish(p)) => assert_eq!(p.topic, "ward/nurse-1/cmd/x"),
        other => panic!("expected its command, got {other:?}"),
    }
    drop(pump);
    drop(nurse);
    gw.stop().await;
    assert_eq!(site.audit_count("edge.session_purged", "nurse-1"), 1);
}

/// Issue 12 (found by reading): a QoS 2 PUBLISH resent before its PUBREL — here with DUP
/// after a reconnect to a persistent session — is the same message: acknowledged again,
/// stored and forwarded once.
#[tokio::test]
async fn a_qos2_publish_resent_after_a_reconnect_reaches_the_hospital_once() {
    let (site, _upstream, mut consumer, mut gw) = ward_with_hospital("").await;

    let mut publish = Publish::new(
        "ward/pump-1/alarm/occlusion",
        QoS::ExactlyOnce,
        b"1".to_vec(),
    );
    publish.pkid = 5;
    let (mut pump, _) = persistent_session(&site, &gw, "pump-1").await;
    pump.send(&RawPacket::Publish(publish.clone())).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubRec(r)) if r.pkid == 5));
    // The connection drops before the pump sends PUBREL; it resends with DUP.
    drop(pump);
    gw.wait_log("edge.disconnected", &["device=pump-1"]).await;
    let (mut pump, _) = persistent_session(&site, &gw, "pump-1").await;
    publish.dup = true;
    pump.send(&RawPacket::Publish(publish)).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubRec(r)) if r.pkid == 5));
    pump.send(&RawPacket::PubRel(PubRel::new(5))).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubComp(c)) if c.pkid == 5));
    // After PUBREL the identifier is free: the same one carries a new message.
    let mut next = Publish::new("ward/pump-1/alarm/cleared", QoS::ExactlyOnce, b"2".to_vec());
    next.pkid = 5;
    pump.send(&RawPacket::Publish(next)).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubRec(r)) if r.pkid == 5));
    pump.send(&RawPacket::PubRel(PubRel::new(5))).await;
    assert!(matches!(pump.recv().await, Some(RawPacket::PubComp(_))));

    let up = "hospital/st-mary/gw-test/pump-1/alarm";
    assert_eq!(
        consumer.next().await.topic,
        format!("{up}/occlusion").as_bytes()
    );
    assert_eq!(
        consumer.next().await.topic,
        format!("{up}/cleared").as_bytes()
    );
    assert_eq!(site.device_json("pump-1")["counters"]["accepted"], 2);
}

/// Issue 12, the fault test: the upstream is out, the spool fills, and one device floods
/// it; then the upstream returns. Every alarm acknowledged arrives, and before any other
/// record; every other record acknowledged either arrives or is counted as evicted (the
/// spool's documented rule: routine before vital, never an alarm); the well-behaved pump
/// is served throughout; the gateway's memory stays bounded (printed).
#[tokio::test]
async fn an_outage_with_a_full_spool_and_a_flooding_device_loses_nothing_acknowledged() {
    let mut site = Site::ward();
    let upstream = Upstream::start_with_acl(&site.path("upstream"), "gw-test", UPSTREAM_ACL).await;
    let link = Link::start(upstream.port, false).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "")
        + "\n[spool]\nmax_bytes = \"256KiB\"\ndevice_quota = \"256KiB\"\n";
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connect_failed", &[]).await;
    let rss_before = gw.rss_kib();

    // pump-1 floods routine status, far more than the spool holds; pump-2 raises an alarm
    // every 100 of them. Every publish here waits for its PUBACK: acknowledged.
    let mut flooder = Client::connect(&site, "pump-1", gw.port()).await;
    let mut pump = Client::connect(&site, "pump-2", gw.port()).await;
    const FLOOD: usize = 3000;
    const ALARMS: usize = 30;
    let filler = vec![b'r'; 200];
    for i in 0..FLOOD {
        flooder
            .publish(&format!("ward/pump-1/status/{i}"), &filler)
            .await;
        if i % (FLOOD / ALARMS) == 0 {
            pump.publish(
                &format!("ward/pump-2/alarm/{}", i / (FLOOD / ALARMS)),
                b"alarm",
            )
            .await;
        }
    }
    let rss_full = gw.rss_kib();
    let evicted = site.device_json("pump-1")["counters"]["evicted"]
        .as_u64()
        .unwrap() as usize;
    assert!(evicted > 0, "the spool filled");

    link.set_up(true);
    let got = consumer
        .until(|g| g.len() >= ALARMS + FLOOD - evicted)
        .await;
    let rss_after = gw.rss_kib();
    println!(
        "gateway RSS: {rss_before} KiB before, {rss_full} KiB with the spool full after \
         {FLOOD} flooded records ({evicted} evicted), {rss_after} KiB after draining"
    );
    let topics: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8(p.topic.to_vec()).unwrap())
        .collect();
    let alarm = "hospital/st-mary/gw-test/pump-2/alarm/";
    assert!(
        topics[..ALARMS].iter().all(|t| t.starts_with(alarm)),
        "alarms first: {:?}",
        &topics[..ALARMS + 3]
    );
    let mut alarms: Vec<usize> = topics[..ALARMS]
        .iter()
        .map(|t| t[alarm.len()..].parse().unwrap())
        .collect();
    alarms.sort_unstable();
    assert_eq!(alarms, (0..ALARMS).collect::<Vec<_>>(), "every alarm, once");
    // The routine records that arrive are the newest, in order, none twice.
    let routine: Vec<usize> = topics[ALARMS..]
        .iter()
        .map(|t| t.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(routine, (evicted..FLOOD).collect::<Vec<_>>());
    assert!(
        rss_full < rss_before + 64 * 1024,
        "memory grew by {} KiB",
        rss_full - rss_before
    );
    gw.stop().await;
    assert_eq!(site.audit_count("spool.evicted", "pump-1"), evicted);
}

/// Issue 14 (the edge acknowledges QoS 1 itself, and only messages a local subscriber wants
/// visit the broker): a device's PUBACKs still come in the order of its PUBLISHes
/// [MQTT-4.6.0-2] when its messages alternate between a topic a display subscribes to and
/// one nobody does, and the display gets every one of its own.
#[tokio::test]
async fn pubacks_keep_the_publish_order_whether_or_not_a_local_subscriber_wants_the_message() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let mut pump = raw_session(&site, &gw, "pump-1", true).await;
    for pkid in 1..=20u16 {
        let topic = if pkid % 2 == 0 {
            "ward/pump-1/alarm/occlusion"
        } else {
            "ward/pump-1/vitals/rate"
        };
        let mut p = Publish::new(topic, QoS::AtLeastOnce, format!("m{pkid}"));
        p.pkid = pkid;
        pump.send(&RawPacket::Publish(p)).await;
    }
    let mut acks = Vec::new();
    while acks.len() < 20 {
        match pump.recv().await {
            Some(RawPacket::PubAck(a)) => acks.push(a.pkid),
            other => panic!("expected a PUBACK, got {other:?}"),
        }
    }
    assert_eq!(acks, (1..=20).collect::<Vec<u16>>());
    for pkid in (2..=20).step_by(2) {
        let p = nurse.next_publish().await;
        assert_eq!(&p.payload[..], format!("m{pkid}").as_bytes());
    }
}

/// Issue 14: a retained message visits the broker though nobody subscribes yet, so a
/// display that subscribes later still gets it.
#[tokio::test]
async fn a_retained_message_reaches_a_display_that_subscribes_later() {
    let site = Site::ward();
    let gw = site.start().await;
    let mut pump = raw_session(&site, &gw, "pump-1", true).await;
    let mut p = Publish::new("ward/pump-1/alarm/state", QoS::AtLeastOnce, "occluded");
    p.pkid = 1;
    p.retain = true;
    pump.send(&RawPacket::Publish(p)).await;
    match pump.recv().await {
        Some(RawPacket::PubAck(a)) => assert_eq!(a.pkid, 1),
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;
    let got = nurse.next_publish().await;
    assert_eq!(&got.payload[..], b"occluded");
    assert!(got.retain, "delivered as the retained message");
}
