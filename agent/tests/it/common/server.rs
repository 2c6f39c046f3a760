//! A static file server for the agent's tests, on a loopback port from the OS: serves a
//! repository directory over HTTP/1.1 (or HTTPS), honours `Range: bytes=N-`, logs every
//! request, and misbehaves on request as a hostile or broken mirror would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the server treats requests for files whose path ends with the fault's suffix.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The first response sends this many body bytes, then the connection drops.
    CutOnceAfter(u64),
    /// Sends the body `n` bytes at a time, waiting between them.
    Trickle(usize, Duration),
    /// No length, the file, then junk for as long as the client reads.
    Endless,
    /// Announces this many bytes (and sends the file).
    Announce(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    /// Body bytes written for it (as far as the socket took them).
    pub sent: u64,
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<(String, Fault)>,
    log: Vec<Request>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
}

pub type Acceptor = tokio_rustls::TlsAcceptor;

impl Server {
    /// Serves `root` until the test's runtime ends; HTTPS when `tls` is given.
    pub async fn start(root: PathBuf, tls: Option<Acceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = Server {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let state = s.state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (root, state, tls) = (root.clone(), state.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(t) => {
                            if let Ok(s) = t.accept(sock).await {
                                serve(s, &root, &state).await;
                            }
                        }
                        None => serve(sock, &root, &state).await,
                    }
                });
            }
        });
        s
    }

    pub fn url(&self, scheme: &str, path: &str) -> url::Url {
        format!("{scheme}://{}/{path}", self.addr).parse().unwrap()
    }

    pub fn fault(&self, suffix: &str, f: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((suffix.to_owned(), f));
    }

    pub fn log(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests whose path ends with `suffix`.
    pub fn requests(&self, suffix: &str) -> Vec<Request> {
        self.log()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .collect()
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    root: &std::path::Path,
    state: &Mutex<State>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_owned());
    let index = {
        let mut s = state.lock().unwrap();
        s.log.push(Request {
            path: path.clone(),
            range: range.clone(),
            sent: 0,
        });
        s.log.len() - 1
    };
    let fault = {
        let mut s = state.lock().unwrap();
        let i = s.faults.iter().position(|(suf, _)| path.ends_with(suf));
        match i.map(|i| (i, s.faults[i].1.clone())) {
            Some((i, f @ Fault::CutOnceAfter(_))) => {
                s.faults.remove(i);
                Some(f)
            }
            Some((_, f)) => Some(f),
            None => None,
        }
    };
    let file = root.join(percent_decoded(path.trim_start_matches('/')));
    let Ok(body) = std::fs::read(&file) else {
        let _ = sock
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
        .min(body.len());
    let total = body.len();
    let body = &body[start..];
    let mut head = if range.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{total}\r\n",
            total.saturating_sub(1)
        )
    } else {
        "HTTP/1.1 200 OK\r\n".to_owned()
    };
    match &fault {
        Some(Fault::Endless) => {}
        Some(Fault::Announce(n)) => head.push_str(&format!("Content-Length: {n}\r\n")),
        _ => head.push_str(&format!("Content-Length: {}\r\n", body.len())),
    }
    head.push_str("Connection: close\r\n\r\n");
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let count = |n: usize| state.lock().unwrap().log[index].sent += n as u64;
    match fault {
        Some(Fault::CutOnceAfter(n)) => {
            let n = usize::try_from(n).unwrap().min(body.len());
            if sock.write_all(&body[..n]).await.is_ok() {
                count(n);
            }
            // Dropped without the rest: the client sees the connection break mid-body.
            return;
        }
        Some(Fault::Trickle(n, every)) => {
            for chunk in body.chunks(n) {
                if sock.write_all(chunk).await.is_err() || sock.flush().await.is_err() {
                    return;
                }
                count(chunk.len());
                tokio::time::sleep(every).await;
            }
        }
        Some(Fault::Endless) => {
            if sock.write_all(body).await.is_err() {
                return;
            }
            count(body.len());
            let junk = vec![0xAAu8; 64 * 1024];
            // Until the client hangs up (bounded, so a broken client cannot hang the test).
            for _ in 0..(1 << 14) {
                if sock.write_all(&junk).await.is_err() {
                    return;
                }
                count(junk.len());
            }
        }
        _ => {
            if sock.write_all(body).await.is_ok() {
                count(body.len());
            }
        }
    }
    let _ = sock.shutdown().await;
}

/// A new CA, written to `ca_pem`, and an acceptor with a certificate for 127.0.0.1 under it.
pub fn tls(ca_pem: &std::path::Path) -> Acceptor {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(ca_pem, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A URL path as the file name it names (`%20` is a space), as any web server reads it.
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
