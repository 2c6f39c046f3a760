//! The report's parts: the machine it ran on, the tables' rows and spreads, and the store
//! scenario's section.

use std::fmt::Write as _;
use std::path::Path;

use crate::measure::Measure;
use crate::store;

pub(crate) fn machine() -> String {
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
pub(crate) fn close_section(report: &mut String, mut table: String, notes: &str) {
    if !notes.is_empty() {
        table.push_str("Errors seen:\n\n");
        table.push_str(notes);
        table.push('\n');
    }
    eprint!("{table}");
    report.push_str(&table);
}

pub(crate) fn spread(values: &[f64]) -> String {
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
pub(crate) fn store_section(work: &Path, runs: usize) -> anyhow::Result<String> {
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

pub(crate) fn row(m: &Measure) -> String {
    format!(
        "{:.0} | {:.1} | {:.1} | {} | {} | {:.0} | {:.0}",
        m.delivered, m.p50_ms, m.p99_ms, m.lost, m.duplicates, m.cpu_pct, m.rss_mb
    )
}
