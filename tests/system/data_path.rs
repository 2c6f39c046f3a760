//! The data path under stress (issue 12): no single device, record or crash may stop,
//! starve or exhaust the gateway. Each test is named after the promise it protects and
//! runs against a real mosquitto upstream and real clients.

use crate::support::clients::Client;
use crate::support::upstream::{property, Link, Upstream};
use crate::support::{Gateway, Site};

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

/// Issue 12, item 2: a record the upstream refuses leaves the in-flight window at once; it
/// is set aside (counted, audited, visible to the engineer) and never holds back what
/// follows it — here an alarm behind more refused records than the window holds.
#[tokio::test]
async fn records_refused_upstream_never_block_the_records_behind_them() {
    let mut site = Site::ward();
    let upstream = Upstream::start_with_acl(&site.path("upstream"), "gw-test", UPSTREAM_ACL).await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "inflight = 2");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.commands_subscribed", &[]).await;

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
        .publish(&long, rumqttc::QoS::AtLeastOnce, false, b"x".to_vec())
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
            rumqttc::QoS::AtLeastOnce,
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
                rumqttc::QoS::AtMostOnce,
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
        crate::support::clients::expect_connack_refusal(
            el,
            rumqttc::ConnectReturnCode::NotAuthorized,
        )
        .await;
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
