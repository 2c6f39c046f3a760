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
//! Run: `cargo bench -p wardgate --bench throughput` (mosquitto must be installed).
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

fn limits() -> SpoolLimits {
    SpoolLimits {
        max_bytes: 1 << 30,
        device_quota: 1 << 30,
        max_age: [Duration::from_secs(86_400); 3],
        cache_bytes: 16 << 20,
    }
}

fn record(device: &DeviceId) -> Record {
    Record {
        device: device.clone(),
        topic: format!("ward/{device}/vitals/hr"),
        payload: Bytes::from(vec![b'v'; PAYLOAD]),
        qos: 1,
        received_at_ms: wardgate::spool::now_ms(),
    }
}

async fn spool_group_commit(dir: &Path) -> f64 {
    let spool = Spool::open(dir, limits()).unwrap();
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
    let spool = Spool::open(dir, limits()).unwrap();
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
    rt.block_on(async {
        let group = spool_group_commit(&base.join("spool-group")).await;
        let each = spool_flush_each(&base.join("spool-each")).await;
        let e2e = end_to_end(&base.join("e2e")).await;
        println!("wardgate throughput ({PAYLOAD}-byte payloads, data under {})", base.display());
        println!("  spool append+flush, group commit ({N} records):   {group:>10.0} records/s");
        println!("  spool append+flush, one flush each ({NAIVE_N} records): {each:>10.0} records/s");
        println!("  device → gateway → mosquitto, QoS 1, {DEVICES} devices × window {WINDOW}: {e2e:>10.0} messages/s");
        println!("  ratio end-to-end / spool group commit: {:.3}", e2e / group);
        println!("  ratio group commit / one flush each:   {:.1}", group / each);
    });
    let _ = std::fs::remove_dir_all(&base);
}
