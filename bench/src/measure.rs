//! One measurement of one target: a load at a rate (`measure`), or an outage and its
//! catch-up (`measure_outage`), read back as a `Measure` or an `Outage`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::link;
use crate::load::{self, now_us, Identity, Receiver};
use crate::target::{self, Kind, Ward};

/// One measurement of one target.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measure {
    pub(crate) offered: f64,
    pub(crate) delivered: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) cpu_pct: f64,
    pub(crate) rss_mb: f64,
    pub(crate) errors: Vec<String>,
}

impl Measure {
    pub(crate) fn sustained(&self) -> bool {
        self.errors.is_empty()
            && self.lost == 0
            && self.p99_ms < 50.0
            && self.delivered >= 0.98 * self.offered
    }
}

pub(crate) const WARMUP: Duration = Duration::from_secs(3);

#[allow(clippy::too_many_arguments)]
pub(crate) async fn measure(
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
pub(crate) async fn wind_down(
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

pub(crate) const CATCH_UP_DEADLINE: Duration = Duration::from_secs(300);
pub(crate) const CATCH_UP_STALL: Duration = Duration::from_secs(60);

/// What the outage scenario measured of one target.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outage {
    /// Messages sent while the line was down.
    pub(crate) backlog: u64,
    /// From the line's return until everything sent before it had arrived.
    pub(crate) catch_up_s: f64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    /// Messages the target acknowledged to their device that never arrived upstream.
    pub(crate) acked_lost: u64,
    pub(crate) acked: u64,
    pub(crate) errors: Vec<String>,
}

/// `rate` messages/s through `kind`; after the warm-up the line to the upstream (`line`)
/// is cut for `outage`, and the catch-up after it returns is timed. With `crash`, the
/// target is killed (SIGKILL) at the end of the outage and started again on its data
/// before the line returns; the devices reconnect.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn measure_outage(
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
