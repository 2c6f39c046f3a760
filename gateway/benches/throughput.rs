//! Throughput benchmark (not a test): how fast the spool can make records durable, and how
//! fast messages flow device → gateway → upstream broker, on the same disk, side by side.
//!
//! 1. Spool, group commit: `N` appends issued back to back, then every `Durable` awaited.
//! 2. Spool, one flush per record: append, await, repeat (what a naive store would do).
//! 3. End to end: `DEVICES` rumqttc clients over mutual TLS publish `N` QoS 1 messages in
//!    total (each with a window of unacknowledged publishes) to `wardgate` (in process);
//!    the uplink forwards to mosquitto (TLS) and a consumer there counts them. Time runs
//!    from the first publish to the last message received upstream. The uplink's
//!    `replay_rate` and `inflight` are raised for this run so that they do not cap it.
//!
//! 4. Isolation under a flood: one well-behaved device publishes `CALM_N` QoS 1 messages
//!    (window `WINDOW`) to the gateway and is timed to its last PUBACK: alone; while
//!    `FLOODERS` other devices of an unlimited class publish as fast as they can; and while
//!    the same number flood under a class rate of `FLOOD_RATE` messages/s (the hard limit
//!    is off for the run, so they are slowed, not quarantined). Reported as ratios to the
//!    device alone.
//!
//! 5. A full spool: `FULL_N` small routine records fill `max_bytes`; `FULL_APPENDS` more
//!    are appended, each evicting the oldest, and timed per append. The index's memory is
//!    the process's resident growth while the full spool is opened, per record. Then the
//!    whole spool is turned over once more (`FULL_N` appends, each evicting) and its
//!    directory's disk use is compared with `max_bytes`.
//!
//! Run: `cargo bench -p wardgate --bench throughput` (mosquitto must be installed);
//! `WARDGATE_BENCH=spool-full` runs measurement 5 alone.
//! Data lives under `target/bench-data`, one disk for all three measurements.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;
use wardgate::app::Gateway;
use wardgate::config::Config;
use wardgate::device::DeviceId;
use wardgate::pki::{self, cert, PkiDir};
use wardgate::spool::{Priority, Record, Spool, SpoolLimits};

const N: usize = 20_000;
const NAIVE_N: usize = 500;
const PAYLOAD: usize = 256;
const DEVICES: usize = 4;
const WINDOW: usize = 32;
const CALM_N: usize = 5_000;
const FLOODERS: usize = 3;
const FLOOD_RATE: u32 = 200;
const FULL_N: usize = 200_000;
const FULL_APPENDS: usize = 2_000;

/// The process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Bytes a directory tree takes on disk (allocated blocks).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_use(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

/// Measurement 5: microseconds per append into a full spool, index bytes per record, and
/// disk use over `max_bytes` after a full turnover.
async fn spool_full(dir: &Path) -> (f64, f64, f64) {
    let device = DeviceId::parse("bench-1").unwrap();
    let small = |n: usize| Record {
        device: device.clone(),
        topic: format!("ward/{device}/status"),
        payload: Bytes::from(format!("{n:08}")),
        qos: 1,
        received_at_ms: wardgate::clock::now_ms(),
        properties: Default::default(),
    };
    let full_bytes = {
        let spool = Spool::open(dir, limits(), wardgate::events::Events::unaudited()).unwrap();
        let mut last = None;
        for n in 0..FULL_N {
            last = Some(spool.append(&small(n), Priority::Routine).unwrap());
        }
        last.unwrap().wait().await.unwrap();
        spool.flush().unwrap();
        spool.stats().bytes
    };
    let before = rss();
    let mut l = limits();
    l.max_bytes = full_bytes;
    l.device_quota = full_bytes;
    let spool = Spool::open(dir, l, wardgate::events::Events::unaudited()).unwrap();
    let index = (rss().saturating_sub(before)) as f64 / FULL_N as f64;
    assert_eq!(spool.stats().records, FULL_N);
    let start = Instant::now();
    for n in 0..FULL_APPENDS {
        spool.append(&small(FULL_N + n), Priority::Routine).unwrap();
    }
    let per_append = start.elapsed().as_secs_f64() * 1e6 / FULL_APPENDS as f64;
    assert_eq!(spool.stats().records, FULL_N);
    let mut last = None;
    for n in 0..FULL_N {
        last = Some(
            spool
                .append(&small(FULL_N + FULL_APPENDS + n), Priority::Routine)
                .unwrap(),
        );
    }
    last.unwrap().wait().await.unwrap();
    spool.flush().unwrap();
    let disk = disk_use(&dir.join("spool-log")) as f64 / full_bytes as f64;
    (per_append, index, disk)
}

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_bytes: 1 << 30,
        device_quota: 1 << 30,
        max_age: [Duration::from_secs(86_400); 3],
        max_rejected: 16 << 20,
        max_records: 1 << 30,
        commit_interval: wardgate::config::DEFAULT_SPOOL_COMMIT_INTERVAL,
    }
}

fn record(device: &DeviceId) -> Record {
    Record {
        device: device.clone(),
        topic: format!("ward/{device}/vitals/hr"),
        payload: Bytes::from(vec![b'v'; PAYLOAD]),
        qos: 1,
        received_at_ms: wardgate::clock::now_ms(),
        properties: Default::default(),
    }
}

async fn spool_group_commit(dir: &Path) -> f64 {
    let spool = Spool::open(dir, limits(), wardgate::events::Events::unaudited()).unwrap();
    let device = DeviceId::parse("bench-1").unwrap();
    let start = Instant::now();
    let waits: Vec<_> = (0..N)
        .map(|_| spool.append(&record(&device), Priority::Vital).unwrap())
        .collect();
    for w in waits {
        w.wait().await.unwrap();
    }
    let rate = N as f64 / start.elapsed().as_secs_f64();
    assert_eq!(spool.next_batch(usize::MAX, &HashSet::new()).len(), N);
    rate
}

async fn spool_flush_each(dir: &Path) -> f64 {
    let spool = Spool::open(dir, limits(), wardgate::events::Events::unaudited()).unwrap();
    let device = DeviceId::parse("bench-1").unwrap();
    let start = Instant::now();
    for _ in 0..NAIVE_N {
        spool
            .append(&record(&device), Priority::Vital)
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    NAIVE_N as f64 / start.elapsed().as_secs_f64()
}

fn device_options(dir: &Path, id: &str, port: u16) -> MqttOptions {
    let d = dir.join("devices");
    let tls = cert::client_config(
        &d.join("ca.pem"),
        &d.join(format!("{id}.pem")),
        &d.join(format!("{id}.key")),
    )
    .unwrap();
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(WINDOW as u16);
    o
}

/// One device publishing `count` QoS 1 messages with `WINDOW` unacknowledged at most.
async fn device_load(opts: MqttOptions, id: String, count: usize) {
    let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
    let mut sent = 0;
    let mut acked = 0;
    let mut outstanding = 0;
    while acked < count {
        while sent < count && outstanding < WINDOW {
            client
                .try_publish(
                    format!("ward/{id}/vitals/hr"),
                    QoS::AtLeastOnce,
                    false,
                    vec![b'v'; PAYLOAD],
                )
                .unwrap();
            sent += 1;
            outstanding += 1;
        }
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
            acked += 1;
            outstanding -= 1;
        }
    }
}

async fn end_to_end(dir: &Path) -> f64 {
    let pki_dir = PkiDir::new(dir.join("pki"));
    pki::init(&pki_dir, "bench-site", "bench-gw", &[]).unwrap();
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i}")).collect();
    for id in &ids {
        pki::issue(
            &pki_dir,
            &DeviceId::parse(id).unwrap(),
            &dir.join("devices"),
            1,
        )
        .unwrap();
    }
    let hospital = wardgate::demo::upstream::start(&dir.join("hospital"), "bench-gw")
        .await
        .unwrap();
    let (ca, cert_path, key) = hospital.client_files("bench-gw");
    let mut toml = format!(
        "[gateway]\nid = \"bench-gw\"\nsite = \"bench-site\"\ndata_dir = \"data\"\n\
         [edge]\nlisten = \"127.0.0.1:0\"\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n\
         [spool]\nmax_bytes = \"1GiB\"\ndevice_quota = \"1GiB\"\n\
         [uplink]\nhost = \"127.0.0.1\"\nport = {}\nca = {ca:?}\ncert = {cert_path:?}\nkey = {key:?}\n\
         topic_prefix = \"hospital\"\ninflight = 256\nreplay_rate = 1000000\n\
         [[device_class]]\nname = \"monitor\"\npublish = [\"ward/{{device}}/#\"]\nvital = [\"ward/{{device}}/vitals/#\"]\n",
        hospital.port
    );
    for id in &ids {
        toml.push_str(&format!(
            "[[device]]\nid = {id:?}\nclass = \"monitor\"\naddress = \"127.0.0.1\"\n"
        ));
    }
    let path = dir.join("wardgate.toml");
    std::fs::write(&path, toml).unwrap();
    let gateway = Gateway::build(Config::load(&path).unwrap()).await.unwrap();
    let port = gateway.edge_addr().port();
    let shutdown = CancellationToken::new();
    let gw = tokio::spawn(gateway.run(shutdown.clone()));

    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let consumer = {
        let (received, stop) = (received.clone(), stop.clone());
        tokio::spawn(async move { hospital.consume_quietly(stop, received, ready_tx).await })
    };
    ready.await.unwrap();

    let start = Instant::now();
    let loads: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(device_load(
                device_options(dir, id, port),
                id.clone(),
                N / DEVICES,
            ))
        })
        .collect();
    for l in loads {
        l.await.unwrap();
    }
    while received.load(Ordering::Relaxed) < (N / DEVICES * DEVICES) as u64 {
        // The consumer counts in its own task; poll its counter.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "upstream stalled at {} of {} messages",
            received.load(Ordering::Relaxed),
            N / DEVICES * DEVICES
        );
    }
    let rate = (N / DEVICES * DEVICES) as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = consumer.await;
    shutdown.cancel();
    let _ = gw.await;
    rate
}

/// A device publishing QoS 1 as fast as its window allows until `stop`.
async fn flood(opts: MqttOptions, id: String, stop: CancellationToken) {
    let (client, mut eventloop) = AsyncClient::new(opts, WINDOW * 2);
    let mut outstanding = 0;
    loop {
        while outstanding < WINDOW {
            if client
                .try_publish(
                    format!("ward/{id}/status"),
                    QoS::AtLeastOnce,
                    false,
                    vec![b'f'; PAYLOAD],
                )
                .is_err()
            {
                break;
            }
            outstanding += 1;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            e = eventloop.poll() => match e {
                Ok(Event::Incoming(Packet::PubAck(_))) => outstanding -= 1,
                Ok(_) => {}
                Err(e) => panic!("flooder {id} lost its connection: {e}"),
            },
        }
    }
}

/// Messages per second of the calm device, with `flooders` running meanwhile.
async fn calm_rate(dir: &Path, port: u16, flooders: &[String]) -> f64 {
    let stop = CancellationToken::new();
    let floods: Vec<_> = flooders
        .iter()
        .map(|id| {
            tokio::spawn(flood(
                device_options(dir, id, port),
                id.clone(),
                stop.clone(),
            ))
        })
        .collect();
    if !flooders.is_empty() {
        // Let the flood build up before the calm device starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = Instant::now();
    device_load(device_options(dir, "calm-1", port), "calm-1".into(), CALM_N).await;
    let rate = CALM_N as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    for f in floods {
        f.await.unwrap();
    }
    rate
}

async fn isolation(dir: &Path) -> (f64, f64, f64) {
    let pki_dir = PkiDir::new(dir.join("pki"));
    pki::init(&pki_dir, "bench-site", "bench-gw", &[]).unwrap();
    let unlimited: Vec<String> = (0..FLOODERS).map(|i| format!("flood-u{i}")).collect();
    let limited: Vec<String> = (0..FLOODERS).map(|i| format!("flood-l{i}")).collect();
    let mut toml = format!(
        "[gateway]\nid = \"bench-gw\"\nsite = \"bench-site\"\ndata_dir = \"data\"\n\
         [edge]\nlisten = \"127.0.0.1:0\"\nca = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n\
         [admin]\nsocket = \"admin.sock\"\n\
         [policy]\nthrottle_limit = \"0s\"\n\
         [spool]\nmax_bytes = \"1GiB\"\ndevice_quota = \"1GiB\"\n\
         [[device_class]]\nname = \"monitor\"\npublish = [\"ward/{{device}}/#\"]\n\
         [[device_class]]\nname = \"limited\"\npublish = [\"ward/{{device}}/#\"]\nmessages_per_sec = {FLOOD_RATE}\n\
         [[device]]\nid = \"calm-1\"\nclass = \"monitor\"\naddress = \"127.0.0.1\"\n"
    );
    for (ids, class) in [(&unlimited, "monitor"), (&limited, "limited")] {
        for id in ids {
            toml.push_str(&format!(
                "[[device]]\nid = {id:?}\nclass = {class:?}\naddress = \"127.0.0.1\"\n"
            ));
        }
    }
    for id in unlimited
        .iter()
        .chain(&limited)
        .map(String::as_str)
        .chain(["calm-1"])
    {
        pki::issue(
            &pki_dir,
            &DeviceId::parse(id).unwrap(),
            &dir.join("devices"),
            1,
        )
        .unwrap();
    }
    let path = dir.join("wardgate.toml");
    std::fs::write(&path, toml).unwrap();
    let gateway = Gateway::build(Config::load(&path).unwrap()).await.unwrap();
    let port = gateway.edge_addr().port();
    let shutdown = CancellationToken::new();
    let gw = tokio::spawn(gateway.run(shutdown.clone()));
    let alone = calm_rate(dir, port, &[]).await;
    let with_unlimited = calm_rate(dir, port, &unlimited).await;
    let with_limited = calm_rate(dir, port, &limited).await;
    shutdown.cancel();
    let _ = gw.await;
    (alone, with_unlimited, with_limited)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,rumqttd=off,rustls=error".into()),
        ))
        .with_writer(std::io::stderr)
        .init();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("WARDGATE_BENCH").as_deref() == Ok("spool-full") {
        let (per_append, index, disk) = rt.block_on(spool_full(&base.join("spool-full")));
        println!("  full spool ({FULL_N} records), append evicting the oldest: {per_append:>8.1} µs/append");
        println!(
            "  full spool, index memory (resident growth at open):    {index:>8.0} bytes/record"
        );
        println!("  full spool, disk use after a full turnover / max_bytes: {disk:>8.2}");
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    rt.block_on(async {
        let (per_append, index, disk) = spool_full(&base.join("spool-full")).await;
        let group = spool_group_commit(&base.join("spool-group")).await;
        let each = spool_flush_each(&base.join("spool-each")).await;
        let e2e = end_to_end(&base.join("e2e")).await;
        let (alone, unlimited, limited) = isolation(&base.join("isolation")).await;
        println!("wardgate throughput ({PAYLOAD}-byte payloads, data under {})", base.display());
        println!("  spool append+flush, group commit ({N} records):   {group:>10.0} records/s");
        println!("  spool append+flush, one flush each ({NAIVE_N} records): {each:>10.0} records/s");
        println!("  device → gateway → mosquitto, QoS 1, {DEVICES} devices × window {WINDOW}: {e2e:>10.0} messages/s");
        println!("  ratio end-to-end / spool group commit: {:.3}", e2e / group);
        println!("  ratio group commit / one flush each:   {:.1}", group / each);
        println!("  well-behaved device → gateway, QoS 1, window {WINDOW}, {CALM_N} messages:");
        println!("    alone:                                       {alone:>10.0} messages/s");
        println!("    with {FLOODERS} unlimited flooders:                  {unlimited:>10.0} messages/s  (ratio {:.3})", unlimited / alone);
        println!("    with {FLOODERS} flooders limited to {FLOOD_RATE}/s:           {limited:>10.0} messages/s  (ratio {:.3})", limited / alone);
        println!("  full spool ({FULL_N} records), append evicting the oldest: {per_append:>8.1} µs/append");
        println!("  full spool, index memory (resident growth at open):    {index:>8.0} bytes/record");
        println!("  full spool, disk use after a full turnover / max_bytes: {disk:>8.2}");
    });
    let _ = std::fs::remove_dir_all(&base);
}
