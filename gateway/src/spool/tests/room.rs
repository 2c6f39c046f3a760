//! Room in the spool: the drain order, eviction under the spool's and a device's limits,
//! expiry, rejected records and held wills.

use super::*;

#[tokio::test]
async fn drains_alarms_first_then_vitals_then_routine_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    for (n, p) in [
        (1, Priority::Routine),
        (2, Priority::Vital),
        (3, Priority::Alarm),
        (4, Priority::Routine),
        (5, Priority::Alarm),
    ] {
        s.append(&rec("pump-1", n), p)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    let order: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        order,
        ["00000003", "00000005", "00000002", "00000001", "00000004"]
    );
    let (first, _) = s.next_batch(1, &HashSet::new()).remove(0);
    s.remove(first);
    assert_eq!(s.stats().records, 4);
    let skip: HashSet<Key> = s
        .next_batch(1, &HashSet::new())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let next = s.next_batch(1, &skip);
    assert_eq!(&next[0].1.payload[..], b"00000002");
}

#[tokio::test]
async fn full_spool_evicts_routine_then_vital_never_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let u = unit(dir.path());
    let s = Spool::open(
        &dir.path().join("s"),
        limits(4 * u, 100 * u),
        Events::unaudited(),
    )
    .unwrap();
    s.append(&rec("pump-1", 1), Priority::Routine).unwrap();
    s.append(&rec("pump-2", 2), Priority::Vital).unwrap();
    s.append(&rec("pump-1", 3), Priority::Routine).unwrap();
    s.append(&rec("pump-2", 4), Priority::Alarm).unwrap();
    // Full. A vital record evicts the oldest routine one.
    s.append(&rec("pump-3", 5), Priority::Vital).unwrap();
    assert_eq!(
        payloads(&s).await,
        [
            (Priority::Alarm, "00000004".into()),
            (Priority::Vital, "00000002".into()),
            (Priority::Vital, "00000005".into()),
            (Priority::Routine, "00000003".into()),
        ]
    );
    // An alarm evicts the remaining routine, then the oldest vital.
    s.append(&rec("pump-3", 6), Priority::Alarm).unwrap();
    s.append(&rec("pump-3", 7), Priority::Alarm).unwrap();
    assert_eq!(
        payloads(&s).await,
        [
            (Priority::Alarm, "00000004".into()),
            (Priority::Alarm, "00000006".into()),
            (Priority::Alarm, "00000007".into()),
            (Priority::Vital, "00000005".into()),
        ]
    );
    // A routine record may not evict anything more urgent: refused.
    let e = s.append(&rec("pump-1", 8), Priority::Routine).unwrap_err();
    assert!(
        matches!(
            e,
            SpoolError::Refused {
                priority: Priority::Routine,
                ..
            }
        ),
        "{e}"
    );
    // One more alarm takes the last vital; the next finds only alarms and is refused.
    s.append(&rec("pump-1", 9), Priority::Alarm).unwrap();
    let e = s.append(&rec("pump-1", 10), Priority::Alarm).unwrap_err();
    assert!(
        matches!(
            e,
            SpoolError::Refused {
                priority: Priority::Alarm,
                ..
            }
        ),
        "{e}"
    );
    let stats = s.stats();
    assert_eq!(stats.records, 4);
    let c = |d: &str| stats.devices[&DeviceId::parse(d).unwrap()];
    assert_eq!(c("pump-1").evicted, 2);
    assert_eq!(c("pump-2").evicted, 1);
    assert_eq!(c("pump-3").evicted, 1);
    assert_eq!(c("pump-1").refused, 2);
    assert_eq!(stats.devices.values().map(|c| c.stored).sum::<u64>(), 8);
}

#[tokio::test]
async fn device_over_its_quota_evicts_its_own_records_first() {
    let dir = tempfile::tempdir().unwrap();
    let u = unit(dir.path());
    let s = Spool::open(
        &dir.path().join("s"),
        limits(100 * u, 2 * u),
        Events::unaudited(),
    )
    .unwrap();
    s.append(&rec("pump-2", 1), Priority::Routine).unwrap();
    s.append(&rec("pump-1", 2), Priority::Routine).unwrap();
    s.append(&rec("pump-1", 3), Priority::Routine).unwrap();
    s.append(&rec("pump-1", 4), Priority::Routine).unwrap();
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    // pump-2's older record stays; pump-1 lost its own oldest.
    assert_eq!(left, ["00000001", "00000003", "00000004"]);
    // Alarms of a device are never evicted, even for its own alarms.
    s.append(&rec("pump-3", 5), Priority::Alarm).unwrap();
    s.append(&rec("pump-3", 6), Priority::Alarm).unwrap();
    assert!(s.append(&rec("pump-3", 7), Priority::Alarm).is_err());
}

#[tokio::test]
async fn old_records_expire_per_class() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits(1 << 20, 1 << 20);
    l.max_age[Priority::Routine as usize] = Duration::from_secs(60);
    {
        // Received two minutes ago, by the wall clock, before a restart.
        let s = Spool::open(dir.path(), l.clone(), Events::unaudited()).unwrap();
        let mut old = rec("pump-1", 1);
        old.received_at_ms -= 120_000;
        s.append(&old, Priority::Routine).unwrap();
        let mut old_alarm = rec("pump-1", 2);
        old_alarm.received_at_ms -= 120_000;
        s.append(&old_alarm, Priority::Alarm).unwrap();
        s.flush().unwrap();
    }
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    s.append(&rec("pump-1", 3), Priority::Routine).unwrap();
    assert_eq!(s.expire(), 1);
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000002", "00000003"]);
    assert_eq!(
        s.stats().devices[&DeviceId::parse("pump-1").unwrap()].expired,
        1
    );
}

/// MQTT 5's Message Expiry Interval: a record expires at the smaller of it and its
/// class's `max_age`, before and after a restart.
#[tokio::test]
async fn a_records_own_expiry_shortens_its_class_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(1 << 20, 1 << 20);
    let with_expiry = |n, secs, ago_ms| {
        let mut r = rec("pump-1", n);
        r.received_at_ms -= ago_ms;
        r.properties.expiry_secs = Some(secs);
        r
    };
    {
        let s = Spool::open(dir.path(), l.clone(), Events::unaudited()).unwrap();
        // 10 s of 30 gone: kept; 40 s gone: expired; 2 h of an expiry past max_age: expired.
        s.append(&with_expiry(1, 30, 10_000), Priority::Alarm)
            .unwrap();
        s.append(&with_expiry(2, 30, 40_000), Priority::Alarm)
            .unwrap();
        s.append(&with_expiry(3, 86_400, 7_200_000), Priority::Vital)
            .unwrap();
        s.append(&rec("pump-1", 4), Priority::Vital).unwrap();
        s.flush().unwrap();
    }
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    assert_eq!(s.expire(), 2);
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000001", "00000004"]);
    // Its properties came back from disk with it.
    let batch = s.next_batch(10, &HashSet::new());
    assert_eq!(batch[0].1.properties.expiry_secs, Some(30));
}

#[tokio::test]
async fn the_gateways_own_stream_makes_room_only_from_its_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let u = unit(dir.path());
    // An audit record is 2 bytes longer than a unit ("_gateway" against "pump-1").
    let s = Spool::open(
        &dir.path().join("s"),
        limits(3 * u + 2, 100 * u),
        Events::unaudited(),
    )
    .unwrap();
    let own = |n| Record {
        device: DeviceId::gateway(),
        ..rec("pump-1", n)
    };
    s.append_own(&own(1), Priority::Vital).unwrap();
    s.append(&rec("pump-1", 2), Priority::Routine).unwrap();
    s.append(&rec("pump-2", 3), Priority::Routine).unwrap();
    // Full: the next audit record evicts the older audit record, not device data.
    s.append_own(&own(4), Priority::Vital).unwrap();
    let got: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["00000004", "00000002", "00000003"]);
    // With no audit record left to evict, it is refused rather than displacing a device's.
    let only_devices = Spool::open(
        &dir.path().join("t"),
        limits(2 * u, 100 * u),
        Events::unaudited(),
    )
    .unwrap();
    only_devices
        .append(&rec("pump-1", 5), Priority::Routine)
        .unwrap();
    only_devices
        .append(&rec("pump-2", 6), Priority::Routine)
        .unwrap();
    assert!(only_devices.append_own(&own(7), Priority::Vital).is_err());
    assert_eq!(only_devices.stats().records, 2);
}

#[tokio::test]
async fn rejected_records_leave_the_drain_order_and_are_kept_within_max_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let one = unit(dir.path());
    // Room for two rejected records (each a little larger than in `records`: the
    // rejection number is part of its key).
    let mut l = limits(1 << 20, 1 << 20);
    l.max_rejected = 2 * (one + 8);
    let s = Spool::open(dir.path(), l.clone(), Events::unaudited()).unwrap();
    for n in 1..=4 {
        s.append(&rec("pump-1", n), Priority::Alarm).unwrap();
    }
    let batch: Vec<Key> = {
        s.settle().await;
        s.next_batch(usize::MAX, &HashSet::new())
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    for key in &batch[..3] {
        s.reject(*key, "upstream answered PUBACK NotAuthorized");
    }
    // Only the fourth is left to forward; the first rejected one was deleted for room.
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000004"]);
    let stats = s.stats();
    assert_eq!((stats.rejected, stats.records), (2, 1));
    assert_eq!(
        stats.devices[&DeviceId::parse("pump-1").unwrap()].rejected,
        3
    );
    drop(s);
    // Kept across a restart, and still out of the drain order.
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    assert_eq!(s.stats().rejected, 2);
    let left: Vec<String> = payloads(&s).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(left, ["00000004"]);
}

#[tokio::test]
async fn a_held_will_takes_room_but_is_neither_forwarded_nor_expired_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits(1 << 20, 1 << 20);
    let max_age = Duration::from_millis(500);
    l.max_age = [max_age; 3];
    let s = Spool::open(dir.path(), l, Events::unaudited()).unwrap();
    let held = s.hold_will(&rec("pump-1", 1), Priority::Alarm).unwrap();
    let dropped = s.hold_will(&rec("pump-2", 2), Priority::Alarm).unwrap();
    assert_eq!(s.stats().records, 2, "held wills take room");
    // Held past every max_age (ages run on the monotonic clock: only time passing makes one).
    std::thread::sleep(max_age + Duration::from_millis(100));
    assert_eq!(s.expire(), 0);
    assert!(
        payloads(&s).await.is_empty(),
        "held wills are not forwarded"
    );

    s.drop_will(dropped);
    assert_eq!(s.stats().records, 1);
    s.release_will(held).unwrap().unwrap().wait().await.unwrap();
    assert!(s.release_will(held).is_none(), "released once");
    assert_eq!(payloads(&s).await, [(Priority::Alarm, "00000001".into())]);
    assert_eq!(
        s.stats().devices[&DeviceId::parse("pump-1").unwrap()].stored,
        1
    );
}

#[tokio::test]
async fn wills_held_when_the_spool_closed_are_deleted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
        s.hold_will(&rec("pump-1", 1), Priority::Alarm).unwrap();
        s.append(&rec("pump-1", 2), Priority::Routine)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    let s = Spool::open(dir.path(), limits(1 << 20, 1 << 20), Events::unaudited()).unwrap();
    assert_eq!(s.stats().records, 1);
    assert_eq!(payloads(&s).await, [(Priority::Routine, "00000002".into())]);
}
