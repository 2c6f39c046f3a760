//! wardgate-bench: the same device load against wardgate and against mosquitto as the ward
//! broker with a QoS 1 bridge, to the same upstream mosquitto, alternating, in one command;
//! a Markdown table of both and their ratios goes to `bench/results/` with the command that
//! made it.
//!
//! Devices (`dev-N`, each with its own certificate over TLS) publish numbered, timestamped
//! QoS 1 messages; a receiver on the upstream times each one end to end and counts what was
//! lost or duplicated. The target's CPU time and resident memory are read from /proc. Every
//! measurement starts its target fresh (empty data directory) and its devices anew.
//!
//! Scenarios (`--scenario`, comma-separated; default `disk,step,idle,outage,crash`):
//! - `disk`: the data disk's raw append+fdatasync rate (one 200-byte record per sync): the
//!   ceiling for a store that syncs every message, which neither target does (wardgate
//!   syncs a batch per group commit; mosquitto's `persistence true` saves on its autosave
//!   interval, so its PUBACK is not durable).
//! - `step`: each offered rate of `--rates` for `--secs` after a warm-up; per rate and target
//!   the delivered rate, p50/p99 latency, loss, duplicates, CPU and RSS; the highest rate
//!   each sustains with p99 under 50 ms, nothing lost and at least 98 % delivered.
//! - `idle`: `--idle-devices` devices at 1 message/s each: RSS and CPU.
//! - `outage`: `--outage-rate` messages/s; the line to the upstream is cut for
//!   `--outage-secs` while the devices go on; then the time until everything sent before
//!   the line came back has arrived (catch-up), the backlog's drain rate, and loss.
//! - `crash`: the outage, with the target killed (SIGKILL) at its end and started again on
//!   its data before the line returns; the devices reconnect and send again what was not
//!   acknowledged. Counted per device: the messages the target acknowledged that never
//!   arrived upstream.
//! - `store` (not in the default list): the spool's workload on the spool's log, sled and
//!   redb, side by side (see `store`).
//!
//! Run with `scripts/bench` (builds both binaries in release and installs mosquitto).

mod link;
mod load;
mod store;
mod target;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use load::{now_us, Identity, Receiver};
use target::{Kind, Ward};

#[derive(Debug, Parser)]
#[command(about = "wardgate against a mosquitto bridge, side by side")]
struct Args {
    /// Scenarios to run, in order: disk, step, idle, outage, crash, store.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "disk,step,idle,outage,crash"
    )]
    scenario: Vec<String>,
    /// Devices publishing in the step scenario.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Payload bytes of each message (at least 20: the header).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Offered rates of the step scenario, messages/s in all.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,5000,10000,15000,20000"
    )]
    rates: Vec<u32>,
    /// Seconds measured per step (after a warm-up of 3 s).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// How many times each measurement alternates between the two targets.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Devices of the idle scenario (1 message/s each).
    #[arg(long, default_value_t = 1000)]
    idle_devices: usize,
    /// Seconds the outage scenario cuts the upstream off.
    #[arg(long, default_value_t = 30)]
    outage_secs: u64,
    /// Offered rate of the outage scenario, messages/s in all.
    #[arg(long, default_value_t = 2000)]
    outage_rate: u32,
    /// Where the Markdown tables go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Scratch space (PKI, data directories), on the data disk to measure.
    #[arg(long, default_value = "target/bench-run")]
    work: PathBuf,
    /// Internal: one phase of the store scenario (`engine:phase`), in `--work`.
    #[arg(long, hide = true)]
    store_worker: Option<String>,
}

/// One measurement of one target.
#[derive(Debug, Clone, Default)]
struct Measure {
    offered: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
    duplicates: u64,
    cpu_pct: f64,
    rss_mb: f64,
    errors: Vec<String>,
}

impl Measure {
    fn sustained(&self) -> bool {
        self.errors.is_empty()
            && self.lost == 0
            && self.p99_ms < 50.0
            && self.delivered >= 0.98 * self.offered
    }
}

const WARMUP: Duration = Duration::from_secs(3);

#[allow(clippy::too_many_arguments)]
async fn measure(
    kind: Kind,
    ward: &Ward,
    devices: &[Identity],
    consumer: &Identity,
    rate: f64,
    size: usize,
    window: Duration,
    dir: &Path,
) -> anyhow::Result<Measure> {
    let _ = std::fs::remove_dir_all(dir);
    let t = target::start(kind, ward, dir).await?;
    let stop_receiver = CancellationToken::new();
    let receiver = Receiver::start(
        ward.upstream,
        consumer,
        devices.len(),
        stop_receiver.clone(),
    )
    .await?;
    let stop = CancellationToken::new();
    let (sent, tasks) = load::start_devices(t.port, devices, rate, size, &stop, false)?;
    tokio::time::sleep(WARMUP).await;
    let (cpu0, _) = target::usage(t.pid)?;
    let sent0 = sent.messages.load(Ordering::Relaxed);
    let w0 = now_us();
    let mut rss_kib = 0;
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        rss_kib = rss_kib.max(target::usage(t.pid)?.1);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (cpu1, rss) = target::usage(t.pid)?;
    rss_kib = rss_kib.max(rss);
    let sent1 = sent.messages.load(Ordering::Relaxed);
    let w1 = now_us();
    let (got, total, errors) =
        wind_down(kind, t, &stop, tasks, &sent, receiver, &stop_receiver).await?;
    let secs = (w1 - w0) as f64 / 1e6;
    let mut latencies: Vec<u64> = got
        .arrivals
        .iter()
        .filter(|(s, _)| (w0..w1).contains(s))
        .map(|(s, r)| r.saturating_sub(*s))
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    let delivered = got
        .arrivals
        .iter()
        .filter(|(_, r)| (w0..w1).contains(r))
        .count();
    Ok(Measure {
        offered: (sent1 - sent0) as f64 / secs,
        delivered: delivered as f64 / secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        lost: total.saturating_sub(got.unique),
        duplicates: got.duplicates,
        cpu_pct: (cpu1 - cpu0) / secs * 100.0,
        rss_mb: rss_kib as f64 / 1024.0,
        errors,
    })
}

/// Stops the devices, waits until everything they sent has arrived (or nothing has for
/// 5 s), stops the receiver and the target; returns what arrived, how many were sent, and
/// the errors seen (the target's exit among them).
async fn wind_down(
    kind: Kind,
    mut t: target::Running,
    stop: &CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: &load::Sent,
    receiver: Receiver,
    stop_receiver: &CancellationToken,
) -> anyhow::Result<(load::Received, u64, Vec<String>)> {
    stop.cancel();
    for task in tasks {
        task.await?;
    }
    let total = sent.messages.load(Ordering::Relaxed);
    let mut last = (
        receiver.count.load(Ordering::Relaxed),
        tokio::time::Instant::now(),
    );
    loop {
        let unique = receiver.got.lock().map(|g| g.unique).unwrap_or(0);
        if unique >= total {
            break;
        }
        let now_count = receiver.count.load(Ordering::Relaxed);
        if now_count != last.0 {
            last = (now_count, tokio::time::Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alive = t.alive();
    stop_receiver.cancel();
    let got = receiver.got.clone();
    receiver.stop().await?;
    t.stop().await?;
    let got = std::mem::take(
        &mut *got
            .lock()
            .map_err(|_| anyhow::anyhow!("receiver poisoned"))?,
    );
    let mut errors = sent.errors.lock().map(|e| e.clone()).unwrap_or_default();
    if !alive {
        errors.push(format!("{} exited during the measurement", kind.name()));
    }
    Ok((got, total, errors))
}

const CATCH_UP_DEADLINE: Duration = Duration::from_secs(300);
const CATCH_UP_STALL: Duration = Duration::from_secs(60);

/// What the outage scenario measured of one target.
#[derive(Debug, Clone, Default)]
struct Outage {
    /// Messages sent while the line was down.
    backlog: u64,
    /// From the line's return until everything sent before it had arrived.
    catch_up_s: f64,
    lost: u64,
    duplicates: u64,
    /// Messages the target acknowledged to their device that never arrived upstream.
    acked_lost: u64,
    acked: u64,
    errors: Vec<String>,
}

/// `rate` messages/s through `kind`; after the warm-up the line to the upstream (`line`)
/// is cut for `outage`, and the catch-up after it returns is timed. With `crash`, the
/// target is killed (SIGKILL) at the end of the outage and started again on its data
/// before the line returns; the devices reconnect.
#[allow(clippy::too_many_arguments)]
async fn measure_outage(
    crash: bool,
    kind: Kind,
    ward: &Ward,
    line: &link::Link,
    receiver_port: u16,
    devices: &[Identity],
    consumer: &Identity,
    rate: f64,
    size: usize,
    outage: Duration,
    dir: &Path,
) -> anyhow::Result<Outage> {
    let _ = std::fs::remove_dir_all(dir);
    line.set_up(true);
    let t = target::start(kind, ward, dir).await?;
    let stop_receiver = CancellationToken::new();
    let receiver = Receiver::start(
        receiver_port,
        consumer,
        devices.len(),
        stop_receiver.clone(),
    )
    .await?;
    let stop = CancellationToken::new();
    let (sent, tasks) = load::start_devices(t.port, devices, rate, size, &stop, crash)?;
    tokio::time::sleep(WARMUP).await;
    line.set_up(false);
    let down_sent = sent.messages.load(Ordering::Relaxed);
    tokio::time::sleep(outage).await;
    let t = if crash {
        t.crash_and_restart().await?
    } else {
        t
    };
    let up_at = now_us();
    let sent_before = sent.messages.load(Ordering::Relaxed);
    let backlog = sent_before - down_sent;
    line.set_up(true);
    // Caught up when every message sent before the line came back has arrived; given up
    // on after CATCH_UP_DEADLINE, or once none of them has arrived for CATCH_UP_STALL.
    let deadline = tokio::time::Instant::now() + CATCH_UP_DEADLINE;
    let mut progress = (0, tokio::time::Instant::now());
    let caught_up = loop {
        let before = receiver
            .got
            .lock()
            .map(|g| g.arrivals.iter().filter(|(s, _)| *s < up_at).count() as u64)
            .unwrap_or(0);
        if before >= sent_before {
            break Ok(now_us());
        }
        if before != progress.0 {
            progress = (before, tokio::time::Instant::now());
        }
        if tokio::time::Instant::now() > deadline {
            break Err(format!(
                "not caught up within {} s",
                CATCH_UP_DEADLINE.as_secs()
            ));
        }
        if progress.1.elapsed() > CATCH_UP_STALL {
            break Err(format!(
                "stalled: nothing sent before the line came back arrived for {} s",
                CATCH_UP_STALL.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (got, total, mut errors) =
        wind_down(kind, t, &stop, tasks, &sent, receiver, &stop_receiver).await?;
    if let Err(e) = &caught_up {
        errors.push(e.clone());
    }
    let acked: Vec<u64> = sent
        .acked
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    Ok(Outage {
        backlog,
        catch_up_s: caught_up.map_or(f64::NAN, |at| (at - up_at) as f64 / 1e6),
        lost: total.saturating_sub(got.unique),
        duplicates: got.duplicates,
        acked_lost: acked
            .iter()
            .enumerate()
            .map(|(d, &n)| got.missing_below(d, n))
            .sum(),
        acked: acked.iter().sum(),
        errors,
    })
}

/// The data disk's append+fdatasync rate: 200-byte records, one sync each, for 3 s.
fn disk_ceiling(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fdatasync.probe");
    let mut f = std::fs::File::create(&path)?;
    let record = [b'r'; 200];
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        f.write_all(&record)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The ward's PKI and `n` device identities under `dir`.
fn ward_pki(dir: &Path, n: usize) -> anyhow::Result<(PathBuf, Vec<Identity>)> {
    use wardgate::device::DeviceId;
    use wardgate::pki::{self, PkiDir};
    let pki_dir = PkiDir::new(dir.join("pki"));
    if !pki_dir.ca_key().exists() {
        pki::init(&pki_dir, target::SITE, target::GATEWAY, &[])?;
    }
    let out = dir.join("devices");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("dev-{i}");
        if !out.join(format!("{id}.pem")).exists() {
            pki::issue(&pki_dir, &DeviceId::parse(&id)?, &out, 7)?;
        }
        ids.push(Identity {
            ca: out.join("ca.pem"),
            cert: out.join(format!("{id}.pem")),
            key: out.join(format!("{id}.key")),
        });
    }
    Ok((dir.join("pki"), ids))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mosquitto = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}); {mosquitto}")
}

/// Ends a scenario's section with the errors its measurements saw (a measurement with
/// errors is not to be trusted), prints it and adds it to the report.
fn close_section(report: &mut String, mut table: String, notes: &str) {
    if !notes.is_empty() {
        table.push_str("Errors seen:\n\n");
        table.push_str(notes);
        table.push('\n');
    }
    eprint!("{table}");
    report.push_str(&table);
}

/// Which target goes first in run `run`: they take turns.
fn alternate(run: usize) -> [Kind; 2] {
    if run.is_multiple_of(2) {
        [Kind::Wardgate, Kind::Mosquitto]
    } else {
        [Kind::Mosquitto, Kind::Wardgate]
    }
}

fn spread(values: &[f64]) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return "–".into();
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if (max - min).abs() < 0.005 {
        format!("{min:.2}")
    } else {
        format!("{min:.2}–{max:.2}")
    }
}

/// The store scenario's tables: every store, `runs` times in rotating order, and each
/// store's figures over the log's, as ranges over the runs.
fn store_section(work: &Path, runs: usize) -> anyhow::Result<String> {
    let mut table = format!(
        "## Store: the spool's workload on each store, {runs} runs in rotating order\n\n\
         Each commit: {} records of {} bytes sealed with the spool's cipher, and once {} are \
         live the same number of the oldest read back, unsealed and deleted; durable when the \
         commit returns. Each store in processes of its own (see `bench/src/store.rs`); the \
         log's `max_bytes` in the churn {} MiB, `commit_interval` 0.\n\n\
         | store | run | churn rec/s | commit p50 ms | p99 ms | peak RSS MB | disk writes B/rec \
         | files / live bytes | 1 rec/commit, commits/s | open 100k s | crash: durable | lost |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        store::BATCH,
        store::PAYLOAD,
        store::LIVE,
        store::CHURN_MAX_BYTES >> 20
    );
    let mut all: Vec<(&str, store::StoreFigures)> = Vec::new();
    for run in 0..runs {
        for i in 0..store::ENGINES.len() {
            let engine = store::ENGINES[(i + run) % store::ENGINES.len()];
            let f = store::measure(engine, &store::dir(work, engine, run))?;
            let _ = writeln!(
                table,
                "| {engine} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {} |",
                run + 1,
                f.churn_rate,
                f.commit_p50_ms,
                f.commit_p99_ms,
                f.rss_mb,
                f.written_per_record,
                f.amplification,
                f.single_rate,
                f.recovery_s,
                f.crash_acked,
                f.crash_lost
            );
            eprintln!("store {engine} run {}: {f:?}", run + 1);
            all.push((engine, f));
        }
    }
    table.push_str(
        "\n| over the log's | churn rec/s | commit p99 | peak RSS | disk writes/rec | files/live | open 100k |\n|---|---|---|---|---|---|---|\n",
    );
    let log: Vec<&store::StoreFigures> = all
        .iter()
        .filter(|(e, _)| *e == "log")
        .map(|(_, f)| f)
        .collect();
    for engine in ["sled", "redb"] {
        let of: Vec<&store::StoreFigures> = all
            .iter()
            .filter(|(e, _)| *e == engine)
            .map(|(_, f)| f)
            .collect();
        let range = |get: fn(&store::StoreFigures) -> f64| {
            let r: Vec<f64> = of.iter().zip(&log).map(|(a, b)| get(a) / get(b)).collect();
            let (lo, hi) = r.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
                (lo.min(*x), hi.max(*x))
            });
            format!("{lo:.2}–{hi:.2}")
        };
        let _ = writeln!(
            table,
            "| {engine} | {} | {} | {} | {} | {} | {} |",
            range(|f| f.churn_rate),
            range(|f| f.commit_p99_ms),
            range(|f| f.rss_mb),
            range(|f| f.written_per_record),
            range(|f| f.amplification),
            range(|f| f.recovery_s),
        );
    }
    table.push('\n');
    Ok(table)
}

fn row(m: &Measure) -> String {
    format!(
        "{:.0} | {:.1} | {:.1} | {} | {} | {:.0} | {:.0}",
        m.delivered, m.p50_ms, m.p99_ms, m.lost, m.duplicates, m.cpu_pct, m.rss_mb
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.store_worker {
        // Off the runtime's workers: the spool's worker starts a runtime of its own.
        return tokio::task::block_in_place(|| store::run_worker(spec, &args.work));
    }
    if args.size < 20 {
        anyhow::bail!("--size must be at least 20 bytes (the header)");
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let work = std::fs::canonicalize(".")?.join(&args.work);
    let _ = std::fs::remove_dir_all(work.join("runs"));
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&args.out)?;
    let stamp = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%M%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut report =
        format!(
        "# wardgate-bench, {stamp}\n\nCommand: `{command}`  \nMachine: {}  \nTargets: wardgate \
         ({profile} build) and mosquitto as the ward broker (TLS, client certificates, ACL, \
         `persistence true`, QoS 1 bridge); both forward to one upstream mosquitto (TLS, \
         client certificates). Each measurement starts its target fresh. Devices publish QoS 1 \
         over TLS 1.3 with their own certificates, {} bytes a message; latency is device \
         publish → upstream receiver. wardgate acknowledges a message once its record is \
         fsync-durable and encrypted; mosquitto acknowledges from memory.\n\n",
        machine(),
        args.size,
        profile = if cfg!(debug_assertions) { "debug" } else { "release" },
    );

    let idle_n = if args.scenario.iter().any(|s| s == "idle") {
        args.idle_devices
    } else {
        0
    };
    let (pki, identities) = ward_pki(&work, args.devices.max(idle_n))?;
    let hospital = wardgate::demo::upstream::start(&work.join("hospital"), target::GATEWAY)
        .await
        .context("upstream mosquitto")?;
    let (ca, cert, key) = hospital.client_files(target::GATEWAY);
    let (cca, ccert, ckey) = hospital.client_files("hospital-consumer");
    let consumer = Identity {
        ca: cca,
        cert: ccert,
        key: ckey,
    };
    let mut ward = Ward {
        pki,
        devices: args.devices,
        upstream: hospital.port,
        uplink: Identity { ca, cert, key },
    };

    for scenario in &args.scenario {
        match scenario.as_str() {
            "disk" => {
                let rate = disk_ceiling(&work.join("runs"))?;
                let line = format!(
                    "## Disk ceiling\n\nappend+fdatasync of one 200-byte record at a time on the \
                     data disk ({}): **{rate:.0} syncs/s**.\n\n",
                    work.display()
                );
                eprint!("{line}");
                report.push_str(&line);
            }
            "step" => {
                ward.devices = args.devices;
                let devices = &identities[..args.devices];
                let mut table = format!(
                    "## Step: {} devices, {} s per rate after {} s warm-up, {} runs alternating\n\n\
                     | offered/s | run | wardgate delivered/s | p50 ms | p99 ms | lost | dup | CPU % | RSS MB \
                     | mosquitto delivered/s | p50 ms | p99 ms | lost | dup | CPU % | RSS MB | delivered ratio | p99 ratio |\n\
                     |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
                    args.devices,
                    args.secs,
                    WARMUP.as_secs(),
                    args.runs
                );
                let mut best = vec![[0.0f64; 2]; args.runs];
                let mut ratios: Vec<(u32, Vec<f64>, Vec<f64>)> = Vec::new();
                let mut notes = String::new();
                for &rate in &args.rates {
                    let mut delivered_ratio = Vec::new();
                    let mut p99_ratio = Vec::new();
                    for (run, best_run) in best.iter_mut().enumerate() {
                        // Alternate which goes first.
                        let order = alternate(run);
                        let mut got = [Measure::default(), Measure::default()];
                        for kind in order {
                            let dir = work.join(format!(
                                "runs/{}-{rate}-{run}",
                                kind.name().replace(' ', "-")
                            ));
                            let m = measure(
                                kind,
                                &ward,
                                devices,
                                &consumer,
                                f64::from(rate),
                                args.size,
                                Duration::from_secs(args.secs),
                                &dir,
                            )
                            .await?;
                            eprintln!(
                                "step {rate}/s run {run} {}: offered {:.0}, {}",
                                kind.name(),
                                m.offered,
                                row(&m)
                            );
                            for e in m.errors.iter().take(3) {
                                let _ =
                                    writeln!(notes, "- {rate}/s run {run}, {}: {e}", kind.name());
                            }
                            got[kind as usize] = m;
                        }
                        let [w, q] = &got;
                        for (i, m) in got.iter().enumerate() {
                            if m.sustained() {
                                best_run[i] = best_run[i].max(f64::from(rate));
                            }
                        }
                        delivered_ratio.push(w.delivered / q.delivered);
                        p99_ratio.push(w.p99_ms / q.p99_ms);
                        let _ = writeln!(
                            table,
                            "| {rate} | {run} | {} | {} | {:.2} | {:.2} |",
                            row(w),
                            row(q),
                            w.delivered / q.delivered,
                            w.p99_ms / q.p99_ms
                        );
                    }
                    ratios.push((rate, delivered_ratio, p99_ratio));
                }
                table.push_str("\n| offered/s | delivered ratio (wardgate / mosquitto) | p99 ratio |\n|---|---|---|\n");
                for (rate, d, p) in &ratios {
                    let _ = writeln!(table, "| {rate} | {} | {} |", spread(d), spread(p));
                }
                let sustained: Vec<f64> = best
                    .iter()
                    .map(|[w, q]| if *q > 0.0 { w / q } else { f64::NAN })
                    .collect();
                let _ = write!(
                    table,
                    "\nHighest offered rate sustained (p99 < 50 ms, nothing lost, ≥ 98 % delivered), \
                     per run: wardgate {:?} msg/s, mosquitto bridge {:?} msg/s; ratio {}.\n\n",
                    best.iter().map(|b| b[0]).collect::<Vec<_>>(),
                    best.iter().map(|b| b[1]).collect::<Vec<_>>(),
                    spread(&sustained)
                );
                close_section(&mut report, table, &notes);
            }
            "idle" => {
                ward.devices = args.idle_devices;
                let devices = &identities[..args.idle_devices];
                let rate = args.idle_devices as f64;
                let mut table = format!(
                    "## Idle-ish: {} devices at 1 message/s each, {} s measured, {} runs alternating\n\n\
                     | run | wardgate delivered/s | p50 ms | p99 ms | lost | dup | CPU % | RSS MB \
                     | mosquitto delivered/s | p50 ms | p99 ms | lost | dup | CPU % | RSS MB | RSS ratio | CPU ratio |\n\
                     |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
                    args.idle_devices, args.secs, args.runs
                );
                let mut notes = String::new();
                let mut rss_ratio = Vec::new();
                let mut cpu_ratio = Vec::new();
                for run in 0..args.runs {
                    let order = alternate(run);
                    let mut got = [Measure::default(), Measure::default()];
                    for kind in order {
                        let dir =
                            work.join(format!("runs/idle-{}-{run}", kind.name().replace(' ', "-")));
                        let m = measure(
                            kind,
                            &ward,
                            devices,
                            &consumer,
                            rate,
                            args.size,
                            Duration::from_secs(args.secs),
                            &dir,
                        )
                        .await?;
                        eprintln!("idle run {run} {}: {}", kind.name(), row(&m));
                        for e in m.errors.iter().take(3) {
                            let _ = writeln!(notes, "- run {run}, {}: {e}", kind.name());
                        }
                        got[kind as usize] = m;
                    }
                    let [w, q] = &got;
                    rss_ratio.push(w.rss_mb / q.rss_mb);
                    cpu_ratio.push(w.cpu_pct / q.cpu_pct);
                    let _ = writeln!(
                        table,
                        "| {run} | {} | {} | {:.2} | {:.2} |",
                        row(w),
                        row(q),
                        w.rss_mb / q.rss_mb,
                        w.cpu_pct / q.cpu_pct
                    );
                }
                let _ = write!(
                    table,
                    "\nRSS ratio (wardgate / mosquitto) {}, CPU ratio {}.\n\n",
                    spread(&rss_ratio),
                    spread(&cpu_ratio)
                );
                close_section(&mut report, table, &notes);
            }
            "outage" | "crash" => {
                let crash = scenario == "crash";
                ward.devices = args.devices;
                let devices = &identities[..args.devices];
                let line = link::Link::start(hospital.port).await?;
                let direct = ward.upstream;
                ward.upstream = line.port;
                let mut table = format!(
                    "## {}: {} devices, {} msg/s, the upstream cut off for {} s{}, {} runs alternating\n\n\
                     | run | target | backlog (messages) | catch-up s | drain rate msg/s | lost | dup | acknowledged | acknowledged, never delivered |\n\
                     |---|---|---|---|---|---|---|---|---|\n",
                    if crash { "Outage and kill -9" } else { "Outage" },
                    args.devices, args.outage_rate, args.outage_secs,
                    if crash { ", the target killed (SIGKILL) at its end and restarted on its data" } else { "" },
                    args.runs
                );
                let mut ratio = Vec::new();
                let mut notes = String::new();
                for run in 0..args.runs {
                    let order = alternate(run);
                    let mut drain = [0.0f64; 2];
                    for kind in order {
                        let dir = work.join(format!(
                            "runs/outage-{}-{run}",
                            kind.name().replace(' ', "-")
                        ));
                        let o = measure_outage(
                            crash,
                            kind,
                            &ward,
                            &line,
                            hospital.port,
                            devices,
                            &consumer,
                            f64::from(args.outage_rate),
                            args.size,
                            Duration::from_secs(args.outage_secs),
                            &dir,
                        )
                        .await?;
                        drain[kind as usize] = o.backlog as f64 / o.catch_up_s;
                        let _ = writeln!(
                            table,
                            "| {run} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} |",
                            kind.name(),
                            o.backlog,
                            o.catch_up_s,
                            drain[kind as usize],
                            o.lost,
                            o.duplicates,
                            if crash {
                                o.acked.to_string()
                            } else {
                                "–".into()
                            },
                            if crash {
                                o.acked_lost.to_string()
                            } else {
                                "–".into()
                            },
                        );
                        for e in o.errors.iter().take(3) {
                            let _ = writeln!(notes, "- run {run}, {}: {e}", kind.name());
                        }
                        eprintln!("outage run {run} {}: {o:?}", kind.name());
                    }
                    ratio.push(drain[0] / drain[1]);
                }
                ward.upstream = direct;
                let _ = write!(
                    table,
                    "\nDrain-rate ratio (wardgate / mosquitto) {}. The drain rate is the backlog \
                     over the catch-up time, live traffic flowing meanwhile; wardgate paces a \
                     backlog at `[uplink] replay_rate`, and the bench runs its \
                     defaults.\n\n",
                    spread(&ratio)
                );
                close_section(&mut report, table, &notes);
            }
            "store" => {
                let section = tokio::task::block_in_place(|| store_section(&work, args.runs))?;
                eprint!("{section}");
                report.push_str(&section);
            }
            other => {
                anyhow::bail!("unknown scenario {other:?} (disk, step, idle, outage, crash, store)")
            }
        }
    }
    let path = args.out.join(format!("{stamp}.md"));
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("written to {}", path.display());
    Ok(())
}
