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
mod measure;
mod report;
mod store;
mod target;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use load::Identity;
use measure::*;
use report::*;
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

/// Which target goes first in run `run`: they take turns.
fn alternate(run: usize) -> [Kind; 2] {
    if run.is_multiple_of(2) {
        [Kind::Wardgate, Kind::Mosquitto]
    } else {
        [Kind::Mosquitto, Kind::Wardgate]
    }
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
