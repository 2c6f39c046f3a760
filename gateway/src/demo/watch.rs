//! The demo's view of the gateway as an operator's tools see it: a one-line status every
//! [`EVERY`] from the metrics endpoint, and at the end the metrics a scraper would read.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How often the status line is printed.
pub const EVERY: Duration = Duration::from_secs(3);

/// `GET path` on the metrics endpoint: the body, or why not.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (_, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP answer"))?;
    Ok(body.to_owned())
}

/// The sum of every sample of `name` (any labels) in `text`.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Prints the status line until `stop`.
pub async fn status_lines(addr: SocketAddr, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    let mut last: Option<(f64, f64)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(text) = get(addr, "/metrics").await else {
            continue;
        };
        let accepted = sample(&text, "wardgate_messages_accepted_total");
        let delivered = sample(&text, "wardgate_uplink_delivered_records_total");
        let secs = EVERY.as_secs_f64();
        let (in_rate, out_rate) = last.map_or((0.0, 0.0), |(a, d)| {
            ((accepted - a) / secs, (delivered - d) / secs)
        });
        last = Some((accepted, delivered));
        let uplink = if sample(&text, "wardgate_uplink_connected") >= 1.0 {
            "connected"
        } else {
            "down"
        };
        let ready = if sample(&text, "wardgate_ready") >= 1.0 {
            "ready"
        } else {
            "NOT READY (GET /health says why)"
        };
        println!(
            "{:>14} │ {} devices │ in {in_rate:.1} msg/s, out {out_rate:.1} msg/s │ spool {} records │ uplink {uplink} │ {ready}",
            "status",
            sample(&text, "wardgate_devices_connected"),
            sample(&text, "wardgate_spool_records"),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_are_summed_over_labels_and_other_names_left_out() {
        let text = "# TYPE wardgate_spool_records gauge\nwardgate_spool_records{priority=\"alarm\"} 2\nwardgate_spool_records{priority=\"vital\"} 3\nwardgate_spool_records_kept 9\n# EOF\n";
        assert_eq!(super::sample(text, "wardgate_spool_records"), 5.0);
        assert_eq!(super::sample(text, "wardgate_missing"), 0.0);
    }
}
