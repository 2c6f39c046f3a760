//! The agent's reports: the journal of its steps (`state_dir/journal.jsonl`, one JSON
//! object a line, fsynced) and their delivery to the gateway's embedded broker, where the
//! gateway audits and forwards them (`_gateway/update/status`); "check now" commands come
//! back on `_gateway/cmd/update`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::state::StateDir;
pub use wardgate_proto::{CheckNow, Report, COMMAND_TOPIC, STATUS_TOPIC};

/// Appends `line` to the journal at `path` and makes it durable; returns the journal's
/// length after it (the line's end offset), or `None` if it could not be written.
pub(crate) fn append(path: &Path, line: &str) -> Option<u64> {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| {
            writeln!(f, "{line}")?;
            f.sync_all()?;
            f.metadata().map(|m| m.len())
        });
    match written {
        Ok(end) => Some(end),
        Err(err) => {
            tracing::error!(event = "update.journal_failed", path = %path.display(), error = %err);
            None
        }
    }
}

/// Sets the credentials the gateway wrote for the agent (`username:password`) on `o`. Read
/// before every connection attempt: they change with every start of the gateway. Without
/// them the attempt is made anyway, and refused.
fn set_credentials(o: &mut rumqttc::MqttOptions, path: &Path) {
    match std::fs::read_to_string(path) {
        Ok(s) => match s.trim_end().split_once(':') {
            Some((user, password)) => {
                o.set_credentials(user, password);
            }
            None => {
                tracing::warn!(event = "update.broker_credentials", path = %path.display(), "broker credentials unreadable: no `user:password`");
            }
        },
        Err(e) => {
            tracing::warn!(event = "update.broker_credentials", path = %path.display(), error = %e, "broker credentials unreadable");
        }
    }
}

/// The agent's MQTT session with the gateway's embedded broker.
///
/// Reports are QoS 1. For `run` (the one process that takes commands) the journal is an
/// outbox: `journal.reported` holds the offset up to which the broker acknowledged it, and
/// at its start `run` sends again every line after that offset — the steps of a trial
/// whose gateway never came up, or made just before a reboot, reach the fleet on the next
/// boot, with their own times. Delivery is at least once: a line acknowledged just before
/// a crash may be sent twice. Other invocations (`check`, `install`, …) send their own
/// steps and leave the offset to `run`.
#[derive(Debug)]
pub(crate) struct Reporter {
    client: rumqttc::AsyncClient,
    published: std::sync::atomic::AtomicU64,
    acked: tokio::sync::watch::Receiver<u64>,
    /// The journal offset each unacknowledged publish ends at, in publish order (`None`:
    /// not journaled); `None` for a process that does not keep the offset.
    outbox: Option<Outbox>,
}

#[derive(Debug, Clone)]
struct Outbox {
    ends: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Option<u64>>>>,
    /// Held from queuing an end to handing its publish to the client, so both orders agree.
    order: std::sync::Arc<tokio::sync::Mutex<()>>,
    reported: PathBuf,
}

impl Outbox {
    /// The journal's lines after the acknowledged offset, each with its end offset. A board
    /// without a readable offset file (a fresh one, one from before it existed, or one whose
    /// file is garbled) starts at the journal's end: old history is not sent again.
    fn backlog(dir: &StateDir) -> Vec<(String, u64)> {
        let journal = std::fs::read(dir.journal()).unwrap_or_default();
        // An offset file that cannot be read or parsed is treated as missing: the whole
        // history is never sent again because of a garbled file.
        let from = std::fs::read_to_string(dir.reported())
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .unwrap_or(journal.len());
        if from > journal.len() {
            // The journal was replaced: send none of it rather than guess.
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut at = from;
        for piece in journal[from..].split_inclusive(|&b| b == b'\n') {
            at += piece.len();
            // A line cut short by a power cut is not a report.
            if piece.ends_with(b"\n") {
                let text = String::from_utf8_lossy(&piece[..piece.len() - 1]).into_owned();
                if serde_json::from_str::<Report>(&text).is_ok() {
                    out.push((text, at as u64));
                }
            }
        }
        out
    }

    /// A publish was acknowledged: the offset moves past it.
    fn acked(&self) {
        let end = self
            .ends
            .lock()
            .ok()
            .and_then(|mut q| q.pop_front())
            .flatten();
        if let Some(end) = end {
            if let Err(e) = crate::files::write_atomic(&self.reported, &format!("{end}\n")) {
                tracing::warn!(event = "update.journal_offset", path = %self.reported.display(), error = %e);
            }
        }
    }
}

impl Reporter {
    pub(crate) fn start(
        broker: std::net::SocketAddr,
        report: &crate::config::Report,
        commands: Option<mpsc::Sender<CheckNow>>,
        state_dir: &StateDir,
    ) -> Reporter {
        // `run` has the configured id; a command by hand beside it (`check`, `status`, …)
        // adds its pid, so the broker never hands it `run`'s session (a takeover would drop
        // `run` and the "check now" commands sent meanwhile).
        let client_id = match &commands {
            Some(_) => report.client_id.clone(),
            None => format!("{}-{}", report.client_id, std::process::id()),
        };
        let mut o = rumqttc::MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        let credentials = report.credentials.clone();
        set_credentials(&mut o, &credentials);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 64);
        let (acked_tx, acked) = tokio::sync::watch::channel(0u64);
        let sub = client.clone();
        let subscribe = commands.is_some();
        let outbox = commands.is_some().then(|| Outbox {
            ends: Default::default(),
            order: Default::default(),
            reported: state_dir.reported(),
        });
        let on_ack = outbox.clone();
        tokio::spawn(async move {
            use rumqttc::{Event, Packet};
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if subscribe => {
                        let _ = sub.try_subscribe(COMMAND_TOPIC, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        if let Some(o) = &on_ack {
                            o.acked();
                        }
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == COMMAND_TOPIC => {
                        let cmd: CheckNow = serde_json::from_slice(&p.payload).unwrap_or_default();
                        tracing::info!(
                            event = "update.check_now",
                            now = cmd.now,
                            "check-now command"
                        );
                        if let Some(tx) = &commands {
                            let _ = tx.try_send(cmd);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(event = "update.broker_link", error = %e, "gateway broker unreachable; retrying");
                        // rumqttc reconnects on the next poll; pause so a stopped gateway
                        // is not spun on. A restarted gateway has made new credentials.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        set_credentials(&mut eventloop.mqtt_options, &credentials);
                    }
                }
            }
        });
        let reporter = Reporter {
            client,
            published: Default::default(),
            acked,
            outbox,
        };
        if reporter.outbox.is_some() {
            let backlog = Outbox::backlog(state_dir);
            if !backlog.is_empty() {
                tracing::info!(
                    event = "update.reports_resent",
                    count = backlog.len(),
                    "journal steps the broker never acknowledged are sent again"
                );
            }
            for (line, end) in backlog {
                reporter.queue(line, Some(end));
            }
        }
        reporter
    }

    /// Hands one report to the client without waiting (the backlog, at start: the
    /// client's queue holds 64, more wait for the next start).
    fn queue(&self, line: String, end: Option<u64>) {
        let Some(o) = &self.outbox else { return };
        let Ok(_order) = o.order.try_lock() else {
            return;
        };
        if self
            .client
            .try_publish(STATUS_TOPIC, rumqttc::QoS::AtLeastOnce, false, line)
            .is_ok()
        {
            self.published
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut q) = o.ends.lock() {
                q.push_back(end);
            }
        }
    }

    pub(crate) async fn publish(&self, line: String, end: Option<u64>) {
        let _order = match &self.outbox {
            Some(o) => Some(o.order.lock().await),
            None => None,
        };
        if let Some(o) = &self.outbox {
            if let Ok(mut q) = o.ends.lock() {
                q.push_back(end);
            }
        }
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self
            .client
            .publish(STATUS_TOPIC, rumqttc::QoS::AtLeastOnce, false, line)
            .await
        {
            tracing::warn!(event = "update.report_failed", error = %e);
            // Never sent, so never acknowledged: it stays in the outbox for the next start.
            if let Some(o) = &self.outbox {
                if let Ok(mut q) = o.ends.lock() {
                    q.pop_back();
                }
            }
            self.published
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub(crate) async fn flush(&self, timeout: Duration) {
        let want = self.published.load(std::sync::atomic::Ordering::SeqCst);
        let mut acked = self.acked.clone();
        let _ = tokio::time::timeout(timeout, acked.wait_for(|n| *n >= want)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_is_what_follows_the_acknowledged_offset_without_a_line_cut_short() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let line = |event: &str| {
            serde_json::to_string(&Report {
                time: crate::agent::now(),
                event: event.into(),
                version: None,
                slot: None,
                detail: String::new(),
            })
            .unwrap()
                + "\n"
        };
        let (a, b, c) = (line("started"), line("health_check"), line("rolled_back"));
        let journal = format!("{a}{b}{c}{{\"time\":\"20");
        std::fs::write(dir.journal(), &journal).unwrap();
        // No offset yet (a fresh board, or one from before the outbox): history stays.
        assert!(Outbox::backlog(&dir).is_empty());
        std::fs::write(dir.reported(), "garbled\n").unwrap();
        assert!(
            Outbox::backlog(&dir).is_empty(),
            "a garbled offset resends nothing"
        );
        std::fs::write(dir.reported(), format!("{}\n", a.len())).unwrap();
        let got = Outbox::backlog(&dir);
        let ends: Vec<u64> = got.iter().map(|(_, e)| *e).collect();
        assert_eq!(
            ends,
            [a.len() + b.len(), a.len() + b.len() + c.len()].map(|n| n as u64)
        );
        assert_eq!(got[1].0, c.trim_end());
        std::fs::write(dir.reported(), format!("{}\n", journal.len() + 1)).unwrap();
        assert!(
            Outbox::backlog(&dir).is_empty(),
            "a replaced journal is not guessed at"
        );
    }
}
