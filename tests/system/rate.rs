//! Rate policy at the edge: a flooding device is slowed, not dropped, and does not slow the
//! others; one that stays over its rate past the hard limit is quarantined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Packet, QoS};

use crate::support::clients::{device_tls, expect_connack_refusal, options, Client};
use crate::support::{Class, Site, DEADLINE};

#[tokio::test]
async fn flooding_device_is_slowed_to_its_rate_with_nothing_lost() {
    let mut site = Site::ward();
    site.classes.push(Class::publishing_own(
        "chatty-monitor",
        "messages_per_sec = 20\nburst = \"500ms\"",
    ));
    site.register("monitor-9", "chatty-monitor", "127.0.0.1");
    let mut gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;

    // The flooder queues 60 alarms at once; the edge admits 10 (the burst) and then 20/s.
    const FLOOD: usize = 60;
    let mut flooder = Client::connect(&site, "monitor-9", gw.port()).await;
    let flood_start = Instant::now();
    for i in 0..FLOOD {
        flooder
            .client
            .publish(
                format!("ward/monitor-9/alarm/{i}"),
                QoS::AtLeastOnce,
                false,
                i.to_string(),
            )
            .await
            .unwrap();
    }
    // Meanwhile a pump without limits publishes and is acknowledged at its own pace.
    let mut pump = Client::connect(&site, "pump-2", gw.port()).await;
    let pump_start = Instant::now();
    for i in 0..20 {
        pump.publish(&format!("ward/pump-2/vitals/{i}"), b"ok")
            .await;
    }
    let pump_time = pump_start.elapsed();

    let mut acked = 0;
    while acked < FLOOD {
        match flooder.next_ack().await {
            Some(Packet::PubAck(_)) => acked += 1,
            other => panic!("flooder lost its connection after {acked} acks: {other:?}"),
        }
    }
    let flood_time = flood_start.elapsed();
    let mut got: Vec<usize> = Vec::new();
    while got.len() < FLOOD {
        let p = tokio::time::timeout(DEADLINE, nurse.next_publish())
            .await
            .unwrap();
        got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
    }
    assert_eq!(got, (0..FLOOD).collect::<Vec<_>>(), "every alarm, in order");
    gw.wait_log("edge.throttled", &["device=monitor-9"]).await;
    assert!(gw.events("edge.throttled", &["device=pump-2"]).is_empty());
    eprintln!(
        "rate test: flooder 60 messages at 20/s (burst 10) acknowledged in {flood_time:?}; \
         unlimited pump 20 messages in {pump_time:?} meanwhile"
    );
}

#[tokio::test]
async fn a_device_flooding_past_the_hard_limit_is_quarantined_and_a_calm_one_is_untouched() {
    let mut site = Site::ward();
    site.classes.push(Class::publishing_own(
        "bedside-monitor",
        "messages_per_sec = 50\nburst = \"200ms\"",
    ));
    site.register("monitor-9", "bedside-monitor", "127.0.0.1");
    site.register("monitor-2", "bedside-monitor", "127.0.0.1");
    site.extra = "\n[policy]\nthrottle_limit = \"2s\"\n".into();
    let mut gw = site.start().await;
    let mut nurse = Client::connect(&site, "nurse-1", gw.port()).await;
    nurse.subscribe("ward/+/alarm/#").await;

    // The calm monitor sends 10 alarms a second, well inside the same class's rate, and
    // waits for each acknowledgement, for as long as the flood lasts.
    let mut calm = Client::connect(&site, "monitor-2", gw.port()).await;
    let flooding = Arc::new(AtomicBool::new(true));
    let calm_task = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut sent = 0usize;
            while flooding.load(Ordering::Relaxed) {
                tick.tick().await;
                calm.publish(&format!("ward/monitor-2/alarm/{sent}"), b"calm")
                    .await;
                sent += 1;
            }
            (sent, start.elapsed())
        })
    };

    // The flooder publishes as fast as its client lets it until the gateway closes it.
    let flood_start = Instant::now();
    let mut flooder = Client::connect(&site, "monitor-9", gw.port()).await;
    let sender = flooder.client.clone();
    let pumping = tokio::spawn(async move {
        let mut i = 0usize;
        while sender
            .publish(
                format!("ward/monitor-9/alarm/{i}"),
                QoS::AtLeastOnce,
                false,
                i.to_string(),
            )
            .await
            .is_ok()
        {
            i += 1;
        }
    });
    let mut acked = 0usize;
    while let Some(p) = flooder.next_ack().await {
        assert!(matches!(p, Packet::PubAck(_)));
        acked += 1;
    }
    let flood_time = flood_start.elapsed();
    flooding.store(false, Ordering::Relaxed);
    pumping.abort();
    gw.wait_log("edge.rate_hard_limit", &["device=monitor-9"])
        .await;
    gw.wait_log("device.quarantined", &["device=monitor-9", "over its rate"])
        .await;

    // Slowed to its rate: never more than the bucket (10) plus 50/s since it connected.
    let shown = site.device_json("monitor-9");
    let accepted = shown["counters"]["accepted"].as_u64().unwrap();
    let bound = 10.0 + 50.0 * flood_time.as_secs_f64();
    assert!(
        (accepted as f64) <= bound + 1.0,
        "{accepted} > {bound}: {shown}"
    );
    assert!(
        shown["counters"]["throttled"].as_u64().unwrap() > 0,
        "{shown}"
    );
    assert!(acked as u64 <= accepted);
    // Nothing lost: every flood message the gateway accepted reached the subscriber.
    let mut flood_got = std::collections::BTreeSet::new();
    let mut calm_got = 0usize;
    let (calm_sent, calm_time) = calm_task.await.unwrap();
    while flood_got.len() < accepted as usize || calm_got < calm_sent {
        let p = nurse.next_publish().await;
        if p.topic.starts_with("ward/monitor-9/") {
            flood_got.insert(
                std::str::from_utf8(&p.payload)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap(),
            );
        } else {
            calm_got += 1;
        }
    }
    assert_eq!(
        flood_got,
        (0..accepted as usize).collect(),
        "the first {accepted}, in full"
    );

    // The calm monitor was never held back, and it is not quarantined.
    let calm_shown = site.device_json("monitor-2");
    assert_eq!(calm_shown["counters"]["throttled"], 0, "{calm_shown}");
    assert_eq!(calm_shown["quarantine"], serde_json::Value::Null);
    assert!(gw
        .events("edge.throttled", &["device=monitor-2"])
        .is_empty());

    // Quarantined: refused on reconnect.
    let (_c, el) = AsyncClient::new(
        options("monitor-9", gw.port(), device_tls(&site, "monitor-9")),
        8,
    );
    expect_connack_refusal(el, ConnectReturnCode::NotAuthorized).await;
    eprintln!(
        "hard-limit test: flooder accepted {accepted} ({acked} acknowledged) in {flood_time:?} \
         at 50/s (burst 10) before quarantine; calm monitor {calm_sent} messages in \
         {calm_time:?} ({:.1}/s), never throttled",
        calm_sent as f64 / calm_time.as_secs_f64()
    );
}
