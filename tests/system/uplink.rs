//! Store-and-forward against a real upstream: mosquitto with TLS, reached through a link the
//! tests cut and restore, and an MQTT 5 consumer on the hospital side.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::{Event, Packet, QoS};

use crate::support::clients::{device_tls, options, Client};
use crate::support::upstream::{property, Link, Upstream};
use crate::support::{Gateway, Site, DEADLINE};

async fn ward_with_upstream(link_up: bool, extra: &str) -> (Site, Upstream, Link) {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, link_up).await;
    site.extra = upstream.uplink_section("gw-test", link.port, extra);
    (site, upstream, link)
}

/// The priority class a test message `i` is published under, and its topic.
fn topic_for(i: usize) -> (&'static str, String) {
    match i % 3 {
        0 => ("alarm", format!("ward/pump-1/alarm/a{i}")),
        1 => ("vital", format!("ward/pump-1/vitals/v{i}")),
        _ => ("routine", format!("ward/pump-1/status/r{i}")),
    }
}

#[tokio::test]
async fn device_messages_reach_upstream_mapped_and_numbered() {
    let (site, upstream, _link) = ward_with_upstream(true, "").await;
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/hr", b"{\"hr\":72}").await;
    pump.client
        .publish("ward/pump-1/status", QoS::AtMostOnce, false, b"ok".to_vec())
        .await
        .unwrap();

    let first = consumer.next().await;
    assert_eq!(
        &first.topic[..],
        b"hospital/st-mary/gw-test/pump-1/vitals/hr"
    );
    assert_eq!(&first.payload[..], b"{\"hr\":72}");
    assert_eq!(first.qos, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    assert_eq!(property(&first, "wardgate-priority"), Some("vital"));
    assert_eq!(property(&first, "wardgate-qos"), Some("1"));
    let second = consumer.next().await;
    assert_eq!(&second.topic[..], b"hospital/st-mary/gw-test/pump-1/status");
    assert_eq!(property(&second, "wardgate-priority"), Some("routine"));
    assert_eq!(property(&second, "wardgate-qos"), Some("0"));
    let seq = |p| property(p, "wardgate-seq").unwrap().parse::<u64>().unwrap();
    assert!(seq(&second) > seq(&first));
    assert!(property(&first, "wardgate-received-at").is_some());
}

#[tokio::test]
async fn backlog_after_an_outage_arrives_complete_alarms_first() {
    let (site, upstream, link) = ward_with_upstream(false, "replay_rate = 300").await;
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connect_failed", &[]).await;

    // While the hospital network is down, the pump keeps publishing; every message is
    // acknowledged (durable in the spool).
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    const N: usize = 150;
    for i in 0..N {
        let (_, topic) = topic_for(i);
        pump.publish(&topic, i.to_string().as_bytes()).await;
    }
    link.set_up(true);
    let got = consumer.until(|g| g.len() >= N).await;
    let classes: Vec<&str> = got
        .iter()
        .map(|p| property(p, "wardgate-priority").unwrap())
        .collect();
    assert!(
        classes[..N / 3].iter().all(|c| *c == "alarm"),
        "{classes:?}"
    );
    assert!(
        classes[N / 3..2 * N / 3].iter().all(|c| *c == "vital"),
        "{classes:?}"
    );
    assert!(
        classes[2 * N / 3..].iter().all(|c| *c == "routine"),
        "{classes:?}"
    );
    let numbers: Vec<usize> = got
        .iter()
        .map(|p| std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
        .collect();
    // Within each class, in the order the device sent them.
    for class in 0..3 {
        let in_class: Vec<usize> = numbers.iter().copied().filter(|i| i % 3 == class).collect();
        let expected: Vec<usize> = (0..N).filter(|i| i % 3 == class).collect();
        assert_eq!(in_class, expected);
    }

    // Cut the link twice more under load; nothing acknowledged goes missing.
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    for cut in 0..2 {
        gw.wait_count("uplink.connected", &[], cut + 1).await;
        for i in 0..60 {
            let n = N + cut * 60 + i;
            pump.publish(&topic_for(n).1, n.to_string().as_bytes())
                .await;
            if i == 20 {
                link.set_up(false);
            }
        }
        gw.wait_count("uplink.disconnected", &[], cut + 1).await;
        link.set_up(true);
    }
    let rest = consumer
        .until(|g| {
            let distinct: std::collections::BTreeSet<&[u8]> =
                g.iter().map(|p| &p.payload[..]).collect();
            distinct.len() >= 120
        })
        .await;
    for p in &rest {
        *seen
            .entry(std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (N..N + 120).collect::<Vec<_>>()
    );
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "outage test: 270 acknowledged, all received; {duplicates} duplicates after link cuts"
    );
}

/// Publishes numbered QoS 1 messages until the connection breaks; returns those acknowledged.
async fn publish_until_broken(
    tls: std::sync::Arc<rustls::ClientConfig>,
    port: u16,
    start: usize,
) -> Vec<usize> {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options("pump-1", port, tls), 64);
    let mut acked = Vec::new();
    let mut sent: std::collections::VecDeque<usize> = Default::default();
    let mut pkids: BTreeMap<u16, usize> = BTreeMap::new();
    let mut next = start;
    loop {
        while sent.len() + pkids.len() < 16 {
            let (_, topic) = topic_for(next);
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, next.to_string())
                .is_err()
            {
                break;
            }
            sent.push_back(next);
            next += 1;
        }
        match tokio::time::timeout(DEADLINE, eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                if let Some(n) = sent.pop_front() {
                    pkids.insert(pkid, n);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some(n) = pkids.remove(&a.pkid) {
                    acked.push(n);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return acked,
        }
    }
}

#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_message() {
    let (site, upstream, _link) = ward_with_upstream(true, "").await;
    let mut consumer = upstream.consumer("hospital/#").await;
    let config = site.write_config();
    let mut acked = Vec::new();
    let mut kills = Vec::new();
    for round in 0..4 {
        let gw = Gateway::start(&config).await;
        let port = gw.port();
        // A moment chosen by the OS's randomness, 100..700 ms into the load.
        let mut b = [0u8; 2];
        getrandom(&mut b);
        let after = Duration::from_millis(100 + u64::from(u16::from_be_bytes(b)) % 600);
        kills.push(after);
        let load = tokio::spawn(publish_until_broken(
            device_tls(&site, "pump-1"),
            port,
            round * 1_000_000,
        ));
        tokio::time::sleep(after).await;
        gw.kill9().await;
        acked.extend(load.await.unwrap());
    }
    // Restart once more and let the backlog drain.
    let _gw = Gateway::start(&config).await;
    let want: std::collections::BTreeSet<usize> = acked.iter().copied().collect();
    let mut received: BTreeMap<usize, usize> = BTreeMap::new();
    while !want.iter().all(|n| received.contains_key(n)) {
        let p = consumer.next().await;
        *received
            .entry(std::str::from_utf8(&p.payload).unwrap().parse().unwrap())
            .or_default() += 1;
    }
    let duplicates: usize = received.values().map(|c| c - 1).sum();
    eprintln!(
        "kill -9 test: kills after {kills:?}; {} acknowledged, all received upstream; {} duplicates",
        want.len(),
        duplicates
    );
    assert!(
        want.len() > 10,
        "the load acknowledged too little to mean anything"
    );
}

fn getrandom(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).unwrap();
}

#[tokio::test]
async fn full_spool_evicts_routine_for_alarms_and_counts_every_eviction() {
    let (site, upstream, link) = ward_with_upstream(
        false,
        "\n[spool]\nmax_bytes = \"64KiB\"\ndevice_quota = \"64KiB\"\n",
    )
    .await;
    let gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    let body = vec![b'x'; 900];
    for i in 0..100 {
        let mut payload = format!("{i:04}").into_bytes();
        payload.extend_from_slice(&body);
        pump.publish(&format!("ward/pump-1/status/r{i}"), &payload)
            .await;
    }
    for i in 0..30 {
        let mut payload = format!("{:04}", 1000 + i).into_bytes();
        payload.extend_from_slice(&body);
        pump.publish(&format!("ward/pump-1/alarm/a{i}"), &payload)
            .await;
    }
    let evictions = gw.events("spool.evicted", &["device=pump-1"]);
    assert!(!evictions.is_empty());
    assert!(
        evictions.iter().all(|l| l.contains("priority=routine")),
        "{evictions:?}"
    );

    let mut consumer = upstream.consumer("hospital/#").await;
    link.set_up(true);
    let expected = 130 - evictions.len();
    let got = consumer.until(|g| g.len() >= expected).await;
    let numbers: Vec<usize> = got
        .iter()
        .map(|p| {
            std::str::from_utf8(&p.payload[..4])
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    // Every alarm survived, first; the oldest routine records were the ones evicted.
    assert_eq!(numbers[..30], (1000..1030).collect::<Vec<_>>()[..]);
    assert_eq!(
        numbers[30..],
        (evictions.len()..100).collect::<Vec<_>>()[..]
    );
    eprintln!(
        "spool-full test: {} routine records evicted for 30 alarms, counted and logged",
        evictions.len()
    );
}

#[tokio::test]
async fn spool_refuses_rather_than_acknowledging_what_it_cannot_keep() {
    let (site, _upstream, _link) = ward_with_upstream(
        false,
        "\n[spool]\nmax_bytes = \"64KiB\"\ndevice_quota = \"64KiB\"\n",
    )
    .await;
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    let body = vec![b'a'; 1000];
    let mut acked = 0;
    loop {
        pump.client
            .publish(
                format!("ward/pump-1/alarm/{acked}"),
                QoS::AtLeastOnce,
                false,
                body.clone(),
            )
            .await
            .unwrap();
        // When the gateway closes the connection the client task ends and this is None.
        let ack = pump.next_ack().await;
        if ack.is_none() {
            break;
        }
        acked += 1;
        assert!(acked < 200, "a 64KiB spool cannot hold 200 KB of alarms");
    }
    gw.wait_log("spool.refused", &["device=pump-1", "priority=alarm"])
        .await;
    assert!(acked > 30, "only {acked} alarms stored");
}

#[tokio::test]
async fn spool_files_hold_no_plaintext() {
    let (site, _upstream, _link) = ward_with_upstream(false, "").await;
    let gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    for i in 0..20 {
        pump.publish(
            "ward/pump-1/vitals/spo2",
            format!("PATIENT-7F3A-MARKER {i}").as_bytes(),
        )
        .await;
    }
    assert!(gw.stop().await.success());
    // No payload or topic anywhere in the data directory; in the spool, not even the
    // device id. (The audit log names devices by design — it holds no payloads.)
    let data = site.path("data");
    let mut files = 0;
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        let in_spool = entry.starts_with(data.join("spool-log"));
        files += usize::from(in_spool);
        let mut needles = vec![&b"PATIENT-7F3A-MARKER"[..], b"vitals/spo2"];
        if in_spool {
            needles.push(b"pump-1");
        }
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in plaintext",
                entry.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
    assert!(files >= 2, "spool files not found under {}", data.display());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("spool.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn corrupt_record_is_reported_and_skipped_the_rest_forwarded() {
    let (site, upstream, link) = ward_with_upstream(false, "").await;
    let gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    for i in 0..5 {
        pump.publish("ward/pump-1/vitals/hr", format!("m{i}").as_bytes())
            .await;
    }
    assert!(gw.stop().await.success());
    // Find the record of "m2" (the spool also holds the gateway's audit stream), offline.
    {
        use std::os::unix::fs::FileExt;
        let config = wardgate::config::Config::load(&site.path("wardgate.toml")).unwrap();
        let spool = wardgate::spool::Spool::open(
            &site.path("data"),
            config.spool,
            wardgate::events::Events::unaudited(),
        )
        .unwrap();
        let batch = spool.next_batch(1000, &Default::default());
        let (key, _) = batch
            .into_iter()
            .find(|(_, r)| &r.payload[..] == b"m2")
            .unwrap();
        // Damage it on disk, in the middle of its sealed bytes.
        let (segment, at, len) = spool.location(key).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment)
            .unwrap();
        let mut b = [0u8];
        let i = at + len as u64 / 2;
        f.read_exact_at(&mut b, i).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], i).unwrap();
    };
    let mut consumer = upstream.consumer("hospital/#").await;
    link.set_up(true);
    let mut gw = site.start().await;
    gw.wait_log("spool.corrupt_record", &[]).await;
    let got = consumer.until(|g| g.len() >= 4).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [&b"m0"[..], b"m1", b"m3", b"m4"]);
}

#[tokio::test]
async fn commands_reach_only_devices_whose_class_may_receive_them() {
    let (site, upstream, _link) = ward_with_upstream(true, "").await;
    let consumer = upstream.consumer("hospital/+/+/+/ack/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.subscribe("ward/pump-1/cmd/#").await;
    let base = "hospital/st-mary/gw-test";
    let send = |topic: String| {
        let c = consumer.client.clone();
        async move {
            c.publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "set 5ml/h",
            )
            .await
            .unwrap()
        }
    };
    send(format!("{base}/pump-1/cmd/rate")).await;
    let got = pump.next_publish().await;
    assert_eq!(got.topic, "ward/pump-1/cmd/rate");
    assert_eq!(&got.payload[..], b"set 5ml/h");
    gw.wait_log("uplink.command_delivered", &["device=pump-1"])
        .await;

    // A nurse display's class may not receive commands; an unknown device gets nothing.
    send(format!("{base}/nurse-1/cmd/reboot")).await;
    gw.wait_log("uplink.command_refused", &["nurse-1", "may not subscribe"])
        .await;
    send(format!("{base}/pump-77/cmd/rate")).await;
    gw.wait_log("uplink.command_refused", &["pump-77", "not registered"])
        .await;
}

#[tokio::test]
async fn records_older_than_their_class_max_age_expire_unsent() {
    // Routine messages may wait 1 ms; alarms keep the default (30 days).
    let (site, upstream, link) =
        ward_with_upstream(false, "\n[spool.max_age]\nroutine = \"1ms\"\n").await;
    let mut gw = site.start().await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/status/battery", b"routine-1")
        .await;
    pump.publish("ward/pump-1/alarm/occlusion", b"alarm-1")
        .await;
    pump.publish("ward/pump-1/status/battery", b"routine-2")
        .await;
    let mut consumer = upstream.consumer("hospital/#").await;
    link.set_up(true);
    let got = consumer.next().await;
    assert_eq!(&got.payload[..], b"alarm-1");
    gw.wait_log(
        "spool.expired",
        &["device=pump-1", "priority=routine", "count=2"],
    )
    .await;
    // Nothing else arrives: the next message upstream is a fresh one, not an expired one.
    pump.publish("ward/pump-1/alarm/air", b"alarm-2").await;
    assert_eq!(&consumer.next().await.payload[..], b"alarm-2");
}

#[tokio::test]
async fn audit_records_travel_upstream_through_the_spool_still_chained() {
    let (site, upstream, _link) = ward_with_upstream(true, "").await;
    site.issue("stranger-1");
    let mut consumer = upstream
        .consumer("hospital/st-mary/gw-test/_gateway/audit")
        .await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let (_c, el) = rumqttc::AsyncClient::new(
        options("stranger-1", gw.port(), device_tls(&site, "stranger-1")),
        8,
    );
    crate::support::clients::expect_connack_refusal(el, rumqttc::ConnectReturnCode::NotAuthorized)
        .await;
    let got = consumer
        .until(|g| {
            g.iter().any(|p| {
                let e: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                e["event"] == "edge.connect_refused" && e["device"] == "stranger-1"
            })
        })
        .await;
    // In order, from the first record, each linking to the one before.
    let records: Vec<serde_json::Value> = got
        .iter()
        .map(|p| serde_json::from_slice(&p.payload).unwrap())
        .collect();
    assert_eq!(records[0]["index"], 0);
    assert_eq!(records[0]["event"], "config.loaded");
    for pair in records.windows(2) {
        assert_eq!(pair[1]["index"], pair[0]["index"].as_u64().unwrap() + 1);
        assert_eq!(pair[1]["prev"], pair[0]["hash"]);
    }
    assert_eq!(property(&got[0], "wardgate-priority"), Some("vital"));
    assert!(gw.stop().await.success());

    // The same records as the gateway's own log, which still verifies.
    let local = site.audit_records();
    for r in &records {
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(&local[i], r);
    }
    let data = site.path("data");
    let (status, _, err) =
        crate::support::wardgate(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert!(status.success(), "{err}");
}

#[tokio::test]
async fn a_quarantined_devices_spooled_data_is_still_forwarded() {
    let (site, upstream, link) = ward_with_upstream(false, "").await;
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connect_failed", &[]).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    for i in 0..5 {
        pump.publish(
            &format!("ward/pump-1/vitals/v{i}"),
            i.to_string().as_bytes(),
        )
        .await;
    }
    site.admin_ok(&[
        "device",
        "quarantine",
        "pump-1",
        "--reason",
        "suspected tampering",
    ]);
    pump.closed().await;
    // The hospital link comes back after the quarantine: what was accepted still goes.
    link.set_up(true);
    let got = consumer.until(|g| g.len() >= 5).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [&b"0"[..], b"1", b"2", b"3", b"4"]);
    assert!(site.device_json("pump-1")["quarantine"]["reason"]
        .as_str()
        .unwrap()
        .contains("suspected tampering"));
}

/// Issue 12 (found by reading): `replay_rate` paces the backlog an outage left, not live
/// traffic. With a rate of 1 per second and the upstream up, 60 messages arrive well within
/// the tests' deadline (20 s) rather than over a minute.
#[tokio::test]
async fn live_traffic_is_not_held_to_the_replay_rate() {
    let (site, upstream, _link) = ward_with_upstream(true, "replay_rate = 1").await;
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    const N: usize = 60;
    for i in 0..N {
        pump.publish(&topic_for(i).1, i.to_string().as_bytes())
            .await;
    }
    let got = tokio::time::timeout(DEADLINE, consumer.until(|g| g.len() >= N))
        .await
        .expect("live traffic held to the replay rate");
    assert_eq!(got.len(), N);
}

/// Issue 12 (found by reading): after an upstream outage long enough for the backoff to
/// reach its ceiling, the uplink is back within `backoff_max` (default 1.5 s) of the
/// upstream's return. Every retry is scheduled within it; the latency measured is printed.
#[tokio::test]
async fn after_an_outage_the_uplink_is_back_within_its_backoff_ceiling() {
    let (mut site, upstream, link) = ward_with_upstream(true, "").await;
    // The default backoff, not the tests' short one.
    let short = "backoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n";
    assert!(site.extra.contains(short));
    site.extra = site.extra.replace(short, "");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    link.set_up(false);
    gw.wait_log("uplink.disconnected", &[]).await;
    // Enough failed attempts for the backoff to reach its ceiling (0.5, 1, 1.5 s).
    gw.wait_count("uplink.connect_failed", &[], 5).await;
    link.set_up(true);
    let back = std::time::Instant::now();
    gw.wait_count("uplink.connected", &[], 2).await;
    println!(
        "uplink back {} ms after the upstream returned",
        back.elapsed().as_millis()
    );
    for line in gw.events("uplink.connect_failed", &[]) {
        let retry: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("retry_in_ms="))
            .and_then(|v| v.parse().ok())
            .expect("retry_in_ms in the line");
        assert!(retry <= 1500, "{line}");
    }
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/alarm/x", b"x").await;
    assert_eq!(
        &consumer.next().await.topic[..],
        b"hospital/st-mary/gw-test/pump-1/alarm/x"
    );
}
