//! Rate policy at the edge: a flooding device is slowed, not dropped, and does not slow the
//! others.

use std::time::Instant;

use rumqttc::{Packet, QoS};

use crate::support::clients::Client;
use crate::support::{Class, Site, DEADLINE};

#[tokio::test]
async fn flooding_device_is_slowed_to_its_rate_with_nothing_lost() {
    let mut site = Site::ward();
    site.classes.push(Class {
        name: "chatty-monitor",
        publish: vec!["ward/{device}/#"],
        subscribe: vec![],
        max_payload: "1KiB",
        extra: "messages_per_sec = 20\nburst = \"500ms\"",
    });
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
