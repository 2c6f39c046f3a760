//! The admin socket: a Unix socket through which the `wardgate` CLI reads state and changes
//! the registry and quarantine of a running gateway.
//!
//! Access control, in two layers:
//! - the socket file is mode 0660, owner root and group `wardgate` (looked up in
//!   `/etc/group`; without such a group it is root-only, 0600). It is created under a
//!   temporary name, given its mode and owner, and only then renamed into place, so no
//!   process ever sees it with looser permissions. The kernel refuses `connect` to anyone
//!   else;
//! - every connection's peer credentials (`SO_PEERCRED`) are checked again: root, the
//!   gateway's own user, or a member of `wardgate` (primary or supplementary group, read
//!   from `/proc/PID/status`). Anyone else is refused and audited (`admin.refused`).
//!
//! Every change is audited with the caller's uid (`admin.command`, then the change's own
//! event: `device.added`, `device.removed`, `device.quarantined`, `device.released`), is
//! persisted before it is answered, and applies at once: a removed or quarantined device's
//! connections are closed.
//!
//! Tested by the admin system tests (`tests/system/admin.rs`), which also connect as an
//! unprivileged user outside the group.

pub mod client;
pub mod proto;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::device::DeviceId;
use crate::edge::EdgeHandle;
use crate::quarantine::Quarantine;
use crate::registry::SharedRegistry;
use crate::spool::Spool;
use proto::{Counters, DeviceTotals, DeviceView, QuarantineView, Request, Response, SpoolStatus};

/// The group whose members may use the admin socket.
pub const ADMIN_GROUP: &str = "wardgate";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

/// What the admin socket reads and changes.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub gateway: String,
    pub site: String,
    pub started: Instant,
    pub edge_addr: String,
    pub registry: SharedRegistry,
    pub quarantine: Arc<Quarantine>,
    pub edge: EdgeHandle,
    pub spool: Spool,
    /// `None` without an `[uplink]`.
    pub uplink_connected: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// `None` without a `[firewall]`.
    pub firewall: Option<Arc<crate::firewall::live::LiveFirewall>>,
    /// The audit log and the devices' counters.
    pub events: crate::events::Events,
    /// Live reload of the configuration; `None` in tools without one.
    pub reloader: Option<Arc<crate::reload::Reloader>>,
}

/// A bound admin socket.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
}

/// The gid of group `name` (through NSS, as `getent group` finds it).
pub fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

impl AdminSocket {
    /// Creates the socket at `path` with its mode and owner (replacing a stale socket).
    pub fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        let err = |source| AdminError::Socket {
            path: path.to_owned(),
            source,
        };
        let group = group_id(ADMIN_GROUP);
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                    .map_err(err)?;
                std::os::unix::fs::chown(dir, None, group).map_err(err)?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path).map_err(err)?;
            }
            Ok(_) => return Err(AdminError::NotASocket(path.to_owned())),
            Err(_) => {}
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(err)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .and_then(|()| {
                std::os::unix::fs::chown(&tmp, Some(0), group).or_else(|e| {
                    // Not root (a development run): the socket stays ours, mode as above.
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
        if group.is_none() {
            tracing::warn!(
                event = "admin.no_group",
                group = ADMIN_GROUP,
                socket = %path.display(),
                "no group {ADMIN_GROUP:?}: the admin socket is for root only"
            );
        }
        Ok(AdminSocket {
            listener,
            path: path.to_owned(),
            group,
        })
    }

    /// Serves requests until `shutdown`; removes the socket file at the end.
    pub async fn run(self, state: AdminState, shutdown: CancellationToken) {
        let state = Arc::new(state);
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(event = "admin.accept_failed", error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let state = state.clone();
            let group = self.group;
            tokio::spawn(async move { serve(stream, state, group).await });
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who is on the other end of a connection, if allowed.
fn authorise(stream: &UnixStream, group: Option<u32>) -> Result<String, String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no peer credentials: {e}"))?;
    let who = format!(
        "uid={} gid={} pid={}",
        cred.uid(),
        cred.gid(),
        cred.pid().map_or("-".into(), |p| p.to_string())
    );
    let own_uid = Some(nix::unistd::geteuid().as_raw());
    // The peer's supplementary groups: the kernel gives a socket peer's uid, gid and pid
    // only, so they are read from its /proc entry.
    let in_group = |gid: u32| {
        cred.gid() == gid
            || cred.pid().is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("Groups:"))
                            .map(|g| g.split_whitespace().any(|g| g == gid.to_string()))
                    })
                    .unwrap_or(false)
            })
    };
    if cred.uid() == 0 || Some(cred.uid()) == own_uid || group.is_some_and(in_group) {
        Ok(who)
    } else {
        Err(who)
    }
}

async fn serve(stream: UnixStream, state: Arc<AdminState>, group: Option<u32>) {
    let who = match authorise(&stream, group) {
        Ok(who) => who,
        Err(who) => {
            state.events.admin_refused(&who);
            let (_, mut wr) = stream.into_split();
            let _ = reply(
                &mut wr,
                &failure(format!("not allowed ({who}): not in group {ADMIN_GROUP}")),
            )
            .await;
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(proto::MAX_REQUEST as u64 * 64)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = if line.len() > proto::MAX_REQUEST {
            failure("request too long".into())
        } else {
            match serde_json::from_str::<Request>(&line) {
                // Requests read stores (sled) and may walk the whole audit chain: off the
                // async workers.
                Ok(request) => {
                    let (state, who) = (state.clone(), who.clone());
                    tokio::task::spawn_blocking(move || handle(&state, &request, &who))
                        .await
                        .unwrap_or_else(|e| failure(format!("request failed: {e}")))
                }
                Err(e) => failure(format!("bad request: {e}")),
            }
        };
        if reply(&mut wr, &response).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

async fn reply(wr: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    wr.write_all(&line).await
}

fn failure(error: String) -> Response {
    Response {
        ok: false,
        data: None,
        error: Some(error),
    }
}

fn success<T: serde::Serialize>(data: &T) -> Response {
    match serde_json::to_value(data) {
        Ok(v) => Response {
            ok: true,
            data: Some(v),
            error: None,
        },
        Err(e) => failure(e.to_string()),
    }
}

/// Why a request was not carried out: the answer's `error`.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("invalid device id {id:?}: {source}")]
    BadId {
        id: String,
        source: crate::device::DeviceIdError,
    },
    #[error("device {0} is not registered")]
    NotRegistered(DeviceId),
    #[error("device {0} is already quarantined")]
    AlreadyQuarantined(DeviceId),
    #[error("device {0} is not quarantined")]
    NotQuarantined(DeviceId),
    #[error("no audit log in this process")]
    NoAuditLog,
    #[error("no live reload in this process")]
    NoReload,
    #[error(transparent)]
    Reload(#[from] crate::reload::ReloadError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Quarantine(#[from] crate::quarantine::QuarantineError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

fn device(id: &str) -> Result<DeviceId, Refusal> {
    DeviceId::parse(id).map_err(|source| Refusal::BadId {
        id: id.to_owned(),
        source,
    })
}

/// Answers one request from `who` (its peer credentials, for the audit log).
pub fn handle(state: &AdminState, request: &Request, who: &str) -> Response {
    if request.changes() {
        let what = serde_json::to_string(request).unwrap_or_default();
        state.events.admin_command(who, &what);
    }
    match execute(state, request, who) {
        Ok(r) => r,
        Err(e) => failure(e.to_string()),
    }
}

fn execute(state: &AdminState, request: &Request, who: &str) -> Result<Response, Refusal> {
    let registry = || {
        state
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    };
    match request {
        Request::Status => Ok(success(&status(state))),
        Request::DeviceList => {
            let mut ids: Vec<DeviceId> = registry().list().into_iter().map(|r| r.id).collect();
            ids.extend(state.quarantine.list().into_iter().map(|(d, _)| d));
            ids.sort();
            ids.dedup();
            let views: Vec<DeviceView> = ids.iter().map(|d| view(state, d)).collect();
            Ok(success(&views))
        }
        Request::DeviceShow { id } => {
            let d = device(id)?;
            if registry().get(&d).is_none() && state.quarantine.entry(&d).is_none() {
                return Err(Refusal::NotRegistered(d));
            }
            Ok(success(&view(state, &d)))
        }
        Request::DeviceAdd { id, class, address } => {
            let d = device(id)?;
            state
                .registry
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .add(&d, class, *address)?;
            if let Some(fw) = &state.firewall {
                fw.refresh();
            }
            state.events.device_added(&d, class, *address, who);
            Ok(success(&view(state, &d)))
        }
        Request::DeviceRemove { id } => {
            let d = device(id)?;
            let removed = state
                .registry
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&d)?;
            let closed = state.edge.close_device(&d);
            if let Some(fw) = &state.firewall {
                fw.refresh();
            }
            state
                .events
                .device_removed(&d, &removed.class, removed.address, closed, who);
            Ok(success(&view(state, &d)))
        }
        Request::DeviceQuarantine { id, reason } => {
            let d = device(id)?;
            if registry().get(&d).is_none() {
                return Err(Refusal::NotRegistered(d));
            }
            let reason = format!("{} (by {who})", reason.trim());
            let newly = state.quarantine.quarantine(&d, &reason)?;
            state.edge.close_device(&d);
            if !newly {
                return Err(Refusal::AlreadyQuarantined(d));
            }
            Ok(success(&view(state, &d)))
        }
        Request::DeviceRelease { id } => {
            let d = device(id)?;
            let released = state.quarantine.release(&d, &format!("by {who}"))?;
            if !released {
                return Err(Refusal::NotQuarantined(d));
            }
            Ok(success(&view(state, &d)))
        }
        Request::AuditTail { count } => {
            let entries = audit_log(state)?.tail((*count).min(MAX_TAIL))?;
            Ok(success(&entries))
        }
        Request::AuditVerify => {
            let n = audit_log(state)?.verify()?;
            Ok(success(&n))
        }
        Request::Reload => {
            let r = state.reloader.as_ref().ok_or(Refusal::NoReload)?;
            Ok(success(&r.reload()?))
        }
    }
}

/// Longest `audit tail` answered over the socket.
const MAX_TAIL: usize = 10_000;

fn audit_log(state: &AdminState) -> Result<&crate::audit::AuditLog, Refusal> {
    state
        .events
        .audit_log()
        .map(|l| &**l)
        .ok_or(Refusal::NoAuditLog)
}

fn status(state: &AdminState) -> proto::Status {
    let spool = state.spool.stats();
    let connected = state.edge.connected();
    let mut devices: Vec<_> = connected.iter().map(|(d, _)| d).collect();
    devices.dedup();
    proto::Status {
        gateway: state.gateway.clone(),
        site: state.site.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: state.started.elapsed().as_secs(),
        edge: state.edge_addr.clone(),
        uplink: match &state.uplink_connected {
            None => "none".into(),
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => "connected".into(),
            Some(_) => "disconnected".into(),
        },
        devices: DeviceTotals {
            registered: state
                .registry
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            connected: devices.len(),
            broker_sessions: state.edge.broker_sessions(),
            quarantined: state.quarantine.list().len(),
        },
        spool: SpoolStatus {
            records: spool.records,
            bytes: spool.bytes,
            corrupt: spool.corrupt,
            rejected: spool.rejected,
        },
        health: Some(state.events.progress().health(crate::progress::Backlog {
            records: spool.records as u64,
        })),
    }
}

fn view(state: &AdminState, d: &DeviceId) -> DeviceView {
    let registered = state
        .registry
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(d);
    let spool = state
        .spool
        .stats()
        .devices
        .get(d)
        .copied()
        .unwrap_or_default();
    DeviceView {
        id: d.to_string(),
        class: registered.as_ref().map(|r| r.class.clone()),
        address: registered.as_ref().map(|r| r.address),
        source: registered.as_ref().map(|r| r.source),
        connections: state
            .edge
            .connected()
            .into_iter()
            .filter(|(c, _)| c == d)
            .map(|(_, p)| p.to_string())
            .collect(),
        quarantine: state.quarantine.entry(d).map(|e| QuarantineView {
            since_ms: e.since_ms,
            reason: e.reason,
        }),
        counters: Counters {
            edge: state.events.counters(d),
            evicted: spool.evicted,
            expired: spool.expired,
            spool_refused: spool.refused,
            rejected: spool.rejected,
        },
    }
}
