//! The agent's transport for update repositories: `file://` (a USB stick in an air-gapped
//! ward) and HTTP(S) with the defences TUF leaves to the transport.
//!
//! - **Slow retrieval**: a download that delivers fewer than `low_speed_bytes_per_sec`
//!   averaged over any `low_speed_window` is abandoned (as curl's `--speed-limit` /
//!   `--speed-time`), and so is a server that does not answer within the window. A server
//!   that trickles bytes cannot hold the agent forever.
//! - **Size caps**: a response that announces, or delivers, more than `max_bytes` is cut
//!   off here, whatever the metadata says. (tough itself stops a target at its signed
//!   length and metadata at its configured maxima: endless data.)
//! - **Resume**: a connection that breaks mid-body is re-made with `Range: bytes=N-` from
//!   the first byte not yet delivered, up to `max_resumes` times, so a flaky ward network
//!   costs only the missing bytes. The stream tough hashes is unbroken: it never sees the
//!   interruption. A server that ignores the range (200) is read past the bytes already
//!   delivered.
//! - A 404 or 410 is `FileNotFound` (tough relies on it to find the newest root).
//! - **Resume across restarts**: given a [`Prefix`] (the first bytes of a target already in
//!   the slot from an earlier, interrupted attempt), the fetch of that target yields those
//!   bytes from the slot and then only the rest from the server (`Range`, or an offset into
//!   a `file://` target), so tough still hashes the whole image.
//!
//! HTTPS trusts only the CA certificates of the configured file (by default the system
//! bundle); TLS is the outer layer, TUF signatures are what make an update trustworthy.
//!
//! Tested by `agent/tests/it/http.rs` against a local server started by the test.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tough::{FilesystemTransport, Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// The system's CA bundle on Debian, used for `https://` unless the config names another.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a download must achieve, and may not exceed.
#[derive(Debug, Clone)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// Average rate below which a download is abandoned, over `low_speed_window`.
    pub low_speed_bytes_per_sec: u64,
    pub low_speed_window: Duration,
    /// No single response may be larger than this.
    pub max_bytes: u64,
    /// How many times a broken body is resumed with a range request.
    pub max_resumes: u32,
    /// Wait before the first resume; doubled for each further one.
    pub resume_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(15),
            low_speed_bytes_per_sec: 1024,
            low_speed_window: Duration::from_secs(30),
            max_bytes: 4 << 30,
            max_resumes: 5,
            resume_backoff: Duration::from_secs(1),
        }
    }
}

/// The transport handed to tough (see the module docs).
#[derive(Debug, Clone)]
pub struct Fetcher {
    limits: Limits,
    ca_file: PathBuf,
    tls: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
    /// Clones share it: set here, taken by the fetch tough makes for the target.
    prefix: Arc<std::sync::Mutex<Option<Prefix>>>,
}

/// The first `len` bytes of target `name` (its name in the targets metadata), already in
/// `file` from an interrupted download.
#[derive(Debug, Clone)]
pub struct Prefix {
    pub name: String,
    pub file: PathBuf,
    pub len: u64,
}

/// Why a request failed (the URL is added by whoever reports it).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Protocol(String),
    #[error("not found ({0})")]
    NotFound(StatusCode),
    #[error("the server answered {0}")]
    Status(StatusCode),
    #[error("{announced} bytes announced, above the cap of {cap}")]
    TooLarge { announced: u64, cap: u64 },
    #[error("bad URL: {0}")]
    Url(String),
    #[error(
        "slow retrieval: {bytes} bytes in {window:?}, below the floor of {floor} bytes/s \
         ({delivered} bytes delivered in all); abandoned"
    )]
    Slow {
        bytes: u64,
        window: Duration,
        floor: u64,
        delivered: u64,
    },
    #[error("more than the cap of {0} bytes; cut off")]
    CutOff(u64),
    #[error(
        "connection broken ({broken}) after {delivered} bytes; gave up after {resumes} resumes"
    )]
    GaveUp {
        broken: String,
        delivered: u64,
        resumes: u32,
    },
    #[error("resume asked for byte {asked} and the server sent range {sent:?}")]
    WrongRange { asked: u64, sent: Option<u64> },
    #[error("resuming from {}: {source}", path.display())]
    Prefix {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("resuming from {}: it ended {left} bytes short", path.display())]
    PrefixShort { path: PathBuf, left: u64 },
}

impl Fetcher {
    pub fn new(limits: Limits, ca_file: Option<&Path>) -> Fetcher {
        Fetcher {
            limits,
            ca_file: ca_file.map_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE), Path::to_owned),
            tls: Arc::default(),
            prefix: Arc::default(),
        }
    }

    /// The next fetch of `p.name` starts with the bytes already in `p.file` (or, with
    /// `None`, nothing is resumed).
    pub fn resume_from(&self, p: Option<Prefix>) {
        *self
            .prefix
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    /// The prefix, if `url` fetches its target: the name as it appears in a URL
    /// (percent-encoded), after a consistent snapshot's hash prefix (`.`) or a directory
    /// (`/`, a repository without consistent snapshots).
    fn take_prefix(&self, url: &Url) -> Option<Prefix> {
        let mut slot = self
            .prefix
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let matches = slot.as_ref().is_some_and(|p| {
            let name = p.name.trim_start_matches('/');
            let encoded = Url::parse("file:///t/")
                .and_then(|base| base.join(name))
                .map(|u| u.path().trim_start_matches("/t/").to_owned())
                .unwrap_or_else(|_| name.to_owned());
            let path = url.path();
            path.ends_with(&format!(".{encoded}")) || path.ends_with(&format!("/{encoded}"))
        });
        matches.then(|| slot.take()).flatten()
    }

    /// Whether a prefix given to [`Fetcher::resume_from`] is still unused: the fetch of its
    /// target did not start from it, so the whole target comes from the source.
    pub fn prefix_pending(&self) -> bool {
        self.prefix
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, HttpError> {
        if let Some(c) = self.tls.get() {
            return Ok(c.clone());
        }
        let tls = HttpError::Tls;
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&self.ca_file)
            .map_err(|e| tls(format!("CA file {}: {e}", self.ca_file.display())))?;
        for c in certs {
            let c = c.map_err(|e| tls(format!("CA file {}: {e}", self.ca_file.display())))?;
            // A bundle may hold certificates rustls cannot use; the rest still count.
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(tls(format!(
                "no usable CA certificate in {}",
                self.ca_file.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(self.tls.get_or_init(|| Arc::new(config)).clone())
    }

    /// One GET, from byte `offset` on: the response once its head has arrived.
    async fn request(&self, url: &Url, offset: u64) -> Result<Response<Incoming>, HttpError> {
        let host = url
            .host_str()
            .ok_or_else(|| HttpError::Url("no host".into()))?
            .to_owned();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| HttpError::Url("no port".into()))?;
        let connect_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = tokio::time::timeout(
            self.limits.connect_timeout,
            TcpStream::connect((connect_host.as_str(), port)),
        )
        .await
        .map_err(|_| HttpError::NoAnswer(self.limits.connect_timeout))?
        .map_err(|e| HttpError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let head = if url.scheme() == "https" {
            let name = rustls_pki_types::ServerName::try_from(connect_host.clone())
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            let connector = tokio_rustls::TlsConnector::from(self.tls_config()?);
            let tls =
                tokio::time::timeout(self.limits.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| HttpError::NoAnswer(self.limits.connect_timeout))?
                    .map_err(|e| HttpError::Tls(e.to_string()))?;
            self.send(url, &host, offset, tls).await?
        } else {
            self.send(url, &host, offset, tcp).await?
        };
        Ok(head)
    }

    async fn send<S>(
        &self,
        url: &Url,
        host: &str,
        offset: u64,
        io: S,
    ) -> Result<Response<Incoming>, HttpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proto = |e: hyper::Error| HttpError::Protocol(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(proto)?;
        tokio::spawn(async move {
            // Ends with the response body (or its error, which the body reports too).
            let _ = conn.await;
        });
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let mut path = url.path().to_owned();
        if let Some(q) = url.query() {
            path = format!("{path}?{q}");
        }
        let mut req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("wardgate-agent/", env!("CARGO_PKG_VERSION")),
            );
        if offset > 0 {
            req = req.header(hyper::header::RANGE, format!("bytes={offset}-"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| HttpError::Url(e.to_string()))?;
        let window = self.limits.low_speed_window;
        tokio::time::timeout(window, sender.send_request(req))
            .await
            .map_err(|_| HttpError::NoAnswer(window))?
            .map_err(proto)
    }

    /// The response's status and head checks: not found, errors, the size cap.
    fn check_head(&self, resp: &Response<Incoming>) -> Result<(), HttpError> {
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Err(HttpError::NotFound(status));
        }
        if !status.is_success() {
            return Err(HttpError::Status(status));
        }
        if let Some(n) = content_length(resp) {
            if n > self.limits.max_bytes {
                return Err(HttpError::TooLarge {
                    announced: n,
                    cap: self.limits.max_bytes,
                });
            }
        }
        Ok(())
    }

    /// GET `url` and return its status code, reading (and discarding) at most 64 KiB of the
    /// body. For health checks.
    pub async fn status(&self, url: &Url) -> Result<StatusCode, HttpError> {
        let mut resp = self.request(url, 0).await?;
        let status = resp.status();
        let mut read = 0usize;
        let window = self.limits.low_speed_window;
        while read < 64 * 1024 {
            match tokio::time::timeout(window, resp.body_mut().frame()).await {
                Ok(Some(Ok(f))) => read += f.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
        Ok(status)
    }

    async fn http(&self, url: Url, prefix: Option<Prefix>) -> Result<TransportStream, HttpError> {
        let start = prefix.as_ref().map_or(0, |p| p.len);
        let resp = self.request(&url, start).await?;
        self.check_head(&resp)?;
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT if start > 0 => {
                let got = content_range_start(&resp);
                if got != Some(start) {
                    return Err(HttpError::Protocol(format!(
                        "asked for byte {start} on, the server sent range {got:?}"
                    )));
                }
                0
            }
            _ => start, // the whole file: read past what the slot has
        };
        let (tx, rx) = mpsc::channel(8);
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(p) = &prefix {
                if let Err(e) = send_prefix(p, &tx).await {
                    let _ = tx.send(Err(transport_error(&url, e))).await;
                    return;
                }
            }
            if let Err(e) = me.pump(&url, resp, &tx, start, skip).await {
                let _ = tx.send(Err(transport_error(&url, e))).await;
            }
        });
        Ok(Box::pin(ChannelStream(rx)))
    }

    /// Moves the body to tough, resuming a broken connection and watching the rate.
    async fn pump(
        &self,
        url: &Url,
        mut resp: Response<Incoming>,
        tx: &mpsc::Sender<Result<Bytes, TransportError>>,
        start: u64,
        mut skip: u64,
    ) -> Result<(), HttpError> {
        let l = &self.limits;
        // Bytes of the target delivered so far, a prefix from the slot included.
        let mut delivered = start;
        let mut resumes = 0u32;
        // `skip`: bytes of the current response still to skip (a server that ignored the
        // range).
        let mut window_start = Instant::now();
        let mut window_bytes = 0u64;
        let floor = l
            .low_speed_bytes_per_sec
            .saturating_mul(l.low_speed_window.as_secs().max(1));
        loop {
            let deadline = window_start + l.low_speed_window;
            let frame = tokio::time::timeout_at(deadline, resp.body_mut().frame()).await;
            if Instant::now() >= deadline {
                if window_bytes < floor {
                    return Err(HttpError::Slow {
                        bytes: window_bytes,
                        window: l.low_speed_window,
                        floor: l.low_speed_bytes_per_sec,
                        delivered,
                    });
                }
                window_start = Instant::now();
                window_bytes = 0;
            }
            let broken = match frame {
                Err(_) => continue, // the window ended with data enough; a new one starts
                Ok(None) => return Ok(()),
                Ok(Some(Ok(f))) => {
                    let Ok(mut data) = f.into_data() else {
                        continue; // trailers
                    };
                    if skip > 0 {
                        let n = skip.min(data.len() as u64);
                        skip -= n;
                        data = data.slice(usize::try_from(n).unwrap_or(data.len())..);
                    }
                    window_bytes += data.len() as u64;
                    delivered += data.len() as u64;
                    if delivered > l.max_bytes {
                        return Err(HttpError::CutOff(l.max_bytes));
                    }
                    if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                        return Ok(()); // tough stopped reading
                    }
                    continue;
                }
                Ok(Some(Err(e))) => e.to_string(),
            };
            // The connection broke mid-body: ask for the rest.
            loop {
                if resumes >= l.max_resumes {
                    return Err(HttpError::GaveUp {
                        broken,
                        delivered,
                        resumes,
                    });
                }
                let backoff = l.resume_backoff * 2u32.saturating_pow(resumes);
                resumes += 1;
                tracing::warn!(
                    event = "download.resume",
                    url = %url,
                    offset = delivered,
                    attempt = resumes,
                    error = %broken,
                    "download interrupted; resuming with a range request"
                );
                tokio::time::sleep(backoff).await;
                match self.request(url, delivered).await {
                    Ok(r) => {
                        self.check_head(&r)?;
                        skip = match r.status() {
                            StatusCode::PARTIAL_CONTENT => {
                                let start = content_range_start(&r);
                                if start != Some(delivered) {
                                    return Err(HttpError::WrongRange {
                                        asked: delivered,
                                        sent: start,
                                    });
                                }
                                0
                            }
                            _ => delivered, // the whole file again: skip what we have
                        };
                        resp = r;
                        window_start = Instant::now();
                        window_bytes = 0;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(event = "download.resume_failed", url = %url, error = %e);
                    }
                }
            }
        }
    }
}

fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    resp.headers()
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` answer.
fn content_range_start(resp: &Response<Incoming>) -> Option<u64> {
    let v = resp
        .headers()
        .get(hyper::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn transport_error(
    url: &Url,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> TransportError {
    TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), e)
}

/// Sends the first `p.len` bytes of `p.file`.
async fn send_prefix(
    p: &Prefix,
    tx: &mpsc::Sender<Result<Bytes, TransportError>>,
) -> Result<(), HttpError> {
    use tokio::io::AsyncReadExt;
    let at = |source| HttpError::Prefix {
        path: p.file.clone(),
        source,
    };
    let mut f = tokio::fs::File::open(&p.file).await.map_err(at)?;
    let mut left = p.len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read(&mut buf[..want]).await.map_err(at)?;
        if n == 0 {
            return Err(HttpError::PrefixShort {
                path: p.file.clone(),
                left,
            });
        }
        left -= n as u64;
        if tx
            .send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// A `file://` target from `p.len` on, after the prefix from the slot.
async fn file_resumed(url: &Url, p: Prefix) -> Result<TransportStream, TransportError> {
    use tokio::io::AsyncSeekExt;
    let path = url
        .to_file_path()
        .map_err(|()| TransportError::new(TransportErrorKind::Other, url.as_str()))?;
    let mut f = tokio::fs::File::open(&path).await.map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            TransportErrorKind::FileNotFound
        } else {
            TransportErrorKind::Other
        };
        TransportError::new_with_cause(kind, url.as_str(), e)
    })?;
    f.seek(std::io::SeekFrom::Start(p.len))
        .await
        .map_err(|e| transport_error(url, e))?;
    let (tx, rx) = mpsc::channel(8);
    let url = url.clone();
    tokio::spawn(async move {
        if let Err(e) = send_prefix(&p, &tx).await {
            let _ = tx.send(Err(transport_error(&url, e))).await;
            return;
        }
        let mut rest = tokio_util::io::ReaderStream::new(f);
        use futures_util::StreamExt;
        while let Some(chunk) = rest.next().await {
            let item = chunk.map_err(|e| transport_error(&url, e));
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(ChannelStream(rx)))
}

#[async_trait::async_trait]
impl Transport for Fetcher {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let prefix = self.take_prefix(&url);
        match url.scheme() {
            "file" => match prefix {
                Some(p) => file_resumed(&url, p).await,
                None => FilesystemTransport.fetch(url).await,
            },
            "http" | "https" => self.http(url.clone(), prefix).await.map_err(|e| {
                let kind = match e {
                    HttpError::NotFound(..) => TransportErrorKind::FileNotFound,
                    _ => TransportErrorKind::Other,
                };
                TransportError::new_with_cause(kind, url.as_str(), e)
            }),
            _ => Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url.as_str(),
            )),
        }
    }
}

/// The receiving end of [`Fetcher::pump`], as the stream tough reads.
struct ChannelStream(mpsc::Receiver<Result<Bytes, TransportError>>);

impl futures_core::Stream for ChannelStream {
    type Item = Result<Bytes, TransportError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
