//! The `store` scenario: the spool's store chosen by measurement (issue 14, item 3).
//!
//! Three stores under the workload the spool puts on its store, each in a process of its
//! own (this binary again, `--store-worker`), so that its memory and its disk writes are its
//! own:
//! - `log`: the spool as it is ([`wardgate::spool::Spool`]): the segment log with group
//!   commit, its in-memory index and its compaction, `commit_interval` 0;
//! - `sled` 0.34 (the spool's store until format 1): one tree, `flush()` per commit;
//! - `redb` 2: one table, one write transaction per commit (`Durability::Immediate`).
//!
//! Every store keeps the same thing: records sealed with the spool's own [`Sealer`]
//! (ChaCha20-Poly1305), under the spool's 9-byte keys, so encryption costs each the same.
//! The workload of one commit is the spool's under steady load: `BATCH` new records, and the
//! `BATCH` oldest read back (unsealed, as the uplink reads them) and deleted once the live
//! set holds `LIVE` records; durable when the commit returns. Measured per store:
//! - `churn`: records/s, commit latency p50/p99, peak RSS (VmHWM), bytes written to the disk
//!   per record (/proc/self/io), and the files' size over the live records' bytes at the end;
//! - `single`: one record per commit (a device in stop-and-wait alone): commits/s;
//! - `recovery`: a store of `RECOVERY_N` records opened and every record read back and
//!   unsealed (the spool does this at open, to find damage before the uplink does);
//! - `crash`: batches written and reported after each commit until SIGKILL; reopened, the
//!   reported records that are missing (acknowledged loss).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use wardgate::clock::now_ms;
use wardgate::device::DeviceId;
use wardgate::spool::record::Sealer;
use wardgate::spool::{Key, Priority, Record, Spool, SpoolLimits};

pub const ENGINES: [&str; 3] = ["log", "sled", "redb"];
pub const BATCH: usize = 32;
pub const LIVE: usize = 50_000;
/// The log's `max_bytes` in the churn: the live set (about 15 MB) twice over.
pub const CHURN_MAX_BYTES: u64 = 32 << 20;
const CHURN: Duration = Duration::from_secs(10);
const SINGLE: Duration = Duration::from_secs(3);
const RECOVERY_N: usize = 100_000;
const CRASH_AFTER: Duration = Duration::from_secs(3);
pub const PAYLOAD: usize = 200;
const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("records");

/// What one store measured.
#[derive(Debug, Clone, Default)]
pub struct StoreFigures {
    pub churn_rate: f64,
    pub commit_p50_ms: f64,
    pub commit_p99_ms: f64,
    pub rss_mb: f64,
    pub written_per_record: f64,
    pub amplification: f64,
    pub single_rate: f64,
    pub recovery_s: f64,
    pub crash_acked: u64,
    pub crash_lost: u64,
}

/// Runs every measurement of `engine` in fresh directories under `dir`.
pub fn measure(engine: &str, dir: &Path) -> anyhow::Result<StoreFigures> {
    let _ = std::fs::remove_dir_all(dir);
    let churn = worker(engine, "churn", &dir.join("churn"))?;
    let single = worker(engine, "single", &dir.join("single"))?;
    worker(engine, "fill", &dir.join("recovery"))?;
    let recovery = worker(engine, "recover", &dir.join("recovery"))?;
    let (acked, last) = crash_run(engine, &dir.join("crash"))?;
    let count = worker(engine, &format!("count:{last}"), &dir.join("crash"))?;
    let _ = std::fs::remove_dir_all(dir);
    let get = |m: &[(String, f64)], k: &str| {
        m.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| *v)
            .with_context(|| format!("{engine}: no {k} reported"))
    };
    let present = get(&count, "present")? as u64;
    Ok(StoreFigures {
        churn_rate: get(&churn, "rate")?,
        commit_p50_ms: get(&churn, "p50_ms")?,
        commit_p99_ms: get(&churn, "p99_ms")?,
        rss_mb: get(&churn, "rss_mb")?,
        written_per_record: get(&churn, "written_per_record")?,
        amplification: get(&churn, "amplification")?,
        single_rate: get(&single, "rate")?,
        recovery_s: get(&recovery, "open_s")?,
        crash_acked: acked,
        crash_lost: acked.saturating_sub(present),
    })
}

/// One phase in a process of its own; its `name=value` lines.
fn worker(engine: &str, phase: &str, dir: &Path) -> anyhow::Result<Vec<(String, f64)>> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--store-worker", &format!("{engine}:{phase}")])
        .arg("--work")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{engine} {phase}: worker failed ({})", out.status);
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout)))
}

fn parse(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        .collect()
}

/// Starts the crash phase, kills it with SIGKILL after [`CRASH_AFTER`]; returns how many
/// records it had reported durable and the highest sequence among them.
fn crash_run(engine: &str, dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--store-worker", &format!("{engine}:crash")])
        .arg("--work")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let reader = std::thread::spawn(move || {
        let mut last = 0u64;
        for line in BufReader::new(stdout).lines() {
            match line.ok().and_then(|l| l.parse::<u64>().ok()) {
                Some(n) => last = n,
                None => break,
            }
        }
        last
    });
    // Killed mid-write: the first report comes within the first commits, then the clock.
    std::thread::sleep(CRASH_AFTER);
    child.kill()?;
    child.wait()?;
    let acked = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    if acked == 0 {
        bail!("{engine} crash: nothing was reported durable before the kill");
    }
    // Records are numbered 1..=acked: the count is the highest.
    Ok((acked, acked))
}

/// The worker's side: `spec` is `engine:phase`; figures go to stdout as `name=value`.
pub fn run_worker(spec: &str, dir: &Path) -> anyhow::Result<()> {
    let (engine, phase) = spec.split_once(':').context("engine:phase")?;
    std::fs::create_dir_all(dir)?;
    // The log bounds its files by `max_bytes` (plus a stated slack), not by what is live:
    // for the churn, `max_bytes` is about twice the live set's bytes, a spool half full.
    let max_bytes = if phase == "churn" {
        CHURN_MAX_BYTES
    } else {
        1 << 30
    };
    let mut store = open(engine, dir, max_bytes)?;
    let sealer = Sealer::new(&[7u8; 32]);
    let device = DeviceId::parse("dev-1")?;
    // The payload starts with the record's number: the crash phase counts by it.
    let record = |n: u64| {
        let mut payload = format!("{n:020}").into_bytes();
        payload.resize(PAYLOAD, b'p');
        Record {
            device: device.clone(),
            topic: "ward/dev-1/t".to_owned(),
            payload: payload.into(),
            qos: 1,
            received_at_ms: now_ms(),
            properties: Default::default(),
        }
    };
    let mut seq = 0u64;
    let mut next_batch = |n: usize| {
        (0..n)
            .map(|_| {
                seq += 1;
                record(seq)
            })
            .collect::<Vec<_>>()
    };
    match phase {
        "churn" => {
            let written0 = disk_writes();
            let mut latencies = Vec::new();
            let mut live = 0usize;
            let mut records = 0u64;
            let start = Instant::now();
            while start.elapsed() < CHURN {
                let batch = next_batch(BATCH);
                let drop = if live >= LIVE { BATCH } else { 0 };
                let t = Instant::now();
                store.commit(&sealer, &batch, drop)?;
                latencies.push(t.elapsed());
                live += batch.len() - drop;
                records += batch.len() as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            latencies.sort_unstable();
            let pct = |p: f64| {
                latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
                    .as_secs_f64()
                    * 1000.0
            };
            let sealed = sealer
                .seal(
                    Key {
                        priority: Priority::Routine,
                        seq: 1,
                    },
                    &record(1),
                )?
                .len();
            let live_bytes = (live * (sealed + 9)) as f64;
            println!("rate={}", records as f64 / secs);
            println!("p50_ms={}", pct(0.5));
            println!("p99_ms={}", pct(0.99));
            println!("rss_mb={}", peak_rss_kib()? as f64 / 1024.0);
            println!(
                "written_per_record={}",
                (disk_writes() - written0) as f64 / records as f64
            );
            store.settle()?;
            println!("amplification={}", disk_use(dir) as f64 / live_bytes);
        }
        "single" => {
            let mut n = 0u64;
            let start = Instant::now();
            while start.elapsed() < SINGLE {
                store.commit(&sealer, &next_batch(1), 0)?;
                n += 1;
            }
            println!("rate={}", n as f64 / start.elapsed().as_secs_f64());
        }
        "fill" => {
            for _ in 0..RECOVERY_N / 250 {
                store.commit(&sealer, &next_batch(250), 0)?;
            }
            println!("filled={RECOVERY_N}");
        }
        "recover" => {
            // `open` above did the store's own opening; the timed open is a second one, of
            // a store closed cleanly by the fill.
            drop(store);
            let start = Instant::now();
            let store = open(engine, dir, max_bytes)?;
            let n = store.recovered(&sealer)?;
            println!("open_s={}", start.elapsed().as_secs_f64());
            if n != RECOVERY_N {
                bail!("{engine}: {n} records read back of {RECOVERY_N}");
            }
        }
        "crash" => {
            let mut durable = 0;
            loop {
                let batch = next_batch(BATCH);
                store.commit(&sealer, &batch, 0)?;
                durable += batch.len();
                // Reported only once durable: what a device would have been acknowledged.
                println!("{durable}");
            }
        }
        p if p.starts_with("count:") => {
            let up_to: u64 = p["count:".len()..].parse()?;
            let present = store
                .numbers(&sealer)?
                .into_iter()
                .filter(|n| (1..=up_to).contains(n))
                .collect::<std::collections::HashSet<_>>()
                .len();
            println!("present={present}");
        }
        p => bail!("unknown phase {p}"),
    }
    Ok(())
}

enum Store {
    Log {
        spool: Spool,
        rt: tokio::runtime::Runtime,
    },
    Sled(sled::Db),
    Redb(redb::Database, u64),
}

fn open(engine: &str, dir: &Path, max_bytes: u64) -> anyhow::Result<Store> {
    Ok(match engine {
        "log" => {
            let limits = SpoolLimits {
                max_bytes,
                device_quota: max_bytes,
                max_age: [Duration::from_secs(86_400); 3],
                max_rejected: 1 << 20,
                max_records: 1 << 30,
                commit_interval: Duration::ZERO,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let spool = rt.block_on(async {
                Spool::open(dir, limits, wardgate::events::Events::unaudited())
            })?;
            Store::Log { spool, rt }
        }
        "sled" => Store::Sled(sled::Config::new().path(dir.join("sled")).open()?),
        "redb" => {
            let db = redb::Database::create(dir.join("spool.redb"))?;
            let last = {
                let r = db.begin_read()?;
                match r.open_table(TABLE) {
                    Ok(t) => {
                        use redb::ReadableTable;
                        t.last()?
                            .map(|(k, _)| Key::from_bytes(k.value()).map_or(0, |k| k.seq))
                            .unwrap_or(0)
                    }
                    Err(redb::TableError::TableDoesNotExist(_)) => 0,
                    Err(e) => return Err(e.into()),
                }
            };
            Store::Redb(db, last)
        }
        e => bail!("unknown engine {e} (one of {ENGINES:?})"),
    })
}

impl Store {
    /// Appends `batch`, reads back and deletes the `drop` oldest records; durable on return.
    fn commit(&mut self, sealer: &Sealer, batch: &[Record], drop: usize) -> anyhow::Result<()> {
        match self {
            Store::Log { spool, rt } => rt.block_on(async {
                let mut last = None;
                for r in batch {
                    last = Some(spool.append(r, Priority::Routine)?);
                }
                if drop > 0 {
                    // What the uplink does with what it forwarded.
                    for (key, _) in spool.next_batch(drop, &Default::default()) {
                        spool.remove(key);
                    }
                }
                if let Some(d) = last {
                    d.wait().await?;
                }
                anyhow::Ok(())
            }),
            Store::Sled(db) => {
                let last = db
                    .last()?
                    .and_then(|(k, _)| Key::from_bytes(&k))
                    .map_or(0, |k| k.seq);
                for (seq, r) in (last + 1..).zip(batch) {
                    let key = Key {
                        priority: Priority::Routine,
                        seq,
                    };
                    db.insert(key.to_bytes(), sealer.seal(key, r)?)?;
                }
                let old: Vec<_> = db.iter().take(drop).collect::<Result<_, _>>()?;
                for (k, v) in old {
                    let key = Key::from_bytes(&k).context("key")?;
                    sealer.open(key, &v)?;
                    db.remove(k)?;
                }
                db.flush()?;
                Ok(())
            }
            Store::Redb(db, next) => {
                use redb::ReadableTable;
                let tx = db.begin_write()?;
                {
                    let mut table = tx.open_table(TABLE)?;
                    for r in batch {
                        *next += 1;
                        let key = Key {
                            priority: Priority::Routine,
                            seq: *next,
                        };
                        table.insert(key.to_bytes().as_slice(), sealer.seal(key, r)?.as_slice())?;
                    }
                    let mut old = Vec::with_capacity(drop);
                    for item in table.iter()?.take(drop) {
                        let (k, v) = item?;
                        let key = Key::from_bytes(k.value()).context("key")?;
                        sealer.open(key, v.value())?;
                        old.push(key.to_bytes());
                    }
                    for k in old {
                        table.remove(k.as_slice())?;
                    }
                }
                tx.commit()?;
                Ok(())
            }
        }
    }

    /// Lets queued work (the log's deferred deletes) reach the disk.
    fn settle(&mut self) -> anyhow::Result<()> {
        if let Store::Log { spool, .. } = self {
            spool.flush()?;
        }
        Ok(())
    }

    /// How many records the store holds, each read back and unsealed once since it opened.
    fn recovered(&self, sealer: &Sealer) -> anyhow::Result<usize> {
        match self {
            // The spool's open has read and checked every record already.
            Store::Log { spool, .. } => Ok(spool.stats().records),
            _ => Ok(self.numbers(sealer)?.len()),
        }
    }

    /// The numbers (see `record`) of every record the store holds, read back and unsealed.
    fn numbers(&self, sealer: &Sealer) -> anyhow::Result<Vec<u64>> {
        let number = |r: Record| -> anyhow::Result<u64> {
            let head = r.payload.get(..20).context("short payload")?;
            Ok(std::str::from_utf8(head)?.parse()?)
        };
        let mut out = Vec::new();
        match self {
            Store::Log { spool, .. } => {
                for (_, r) in spool.next_batch(usize::MAX, &Default::default()) {
                    out.push(number(r)?);
                }
            }
            Store::Sled(db) => {
                for item in db.iter() {
                    let (k, v) = item?;
                    out.push(number(
                        sealer.open(Key::from_bytes(&k).context("key")?, &v)?,
                    )?);
                }
            }
            Store::Redb(db, _) => {
                use redb::ReadableTable;
                let r = db.begin_read()?;
                let table = match r.open_table(TABLE) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
                    Err(e) => return Err(e.into()),
                };
                for item in table.iter()? {
                    let (k, v) = item?;
                    let key = Key::from_bytes(k.value()).context("key")?;
                    out.push(number(sealer.open(key, v.value())?)?);
                }
            }
        }
        Ok(out)
    }
}

/// Bytes this process has caused to be written to the disk.
fn disk_writes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM")
}

/// Bytes a directory tree takes on disk (allocated blocks).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_use(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Where the store scenario works: beside the other runs, on the data disk.
pub fn dir(work: &Path, engine: &str, run: usize) -> PathBuf {
    work.join(format!("runs/store-{engine}-{run}"))
}
