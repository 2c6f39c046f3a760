//! The edge's TLS configuration: server certificate, device CA, CRLs.
//!
//! Decisions:
//! - TLS 1.2 and 1.3 only, ring provider.
//! - A client certificate is required and verified against every CA in the `ca` file and
//!   every CRL in the `crl` file; a certificate whose revocation status the CRLs cannot
//!   tell is refused.
//! - Session resumption is off (no session cache, no tickets), so every connection is
//!   verified in full against the CRL in force at that moment.
//! - A CRL past its nextUpdate is still used, with a warning: a stale CRL must not take a
//!   ward's devices offline.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;

use crate::config::EdgeConfig;
use crate::pki::cert::{self, PemError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{path}: no usable CA certificate: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(String),
    #[error("server certificate or key refused: {0}")]
    ServerCert(String),
}

/// One consistent set of TLS material: what new handshakes use, and the verifier that live
/// connections are checked against after a reload.
#[derive(Debug)]
pub struct TlsMaterial {
    pub server_config: Arc<ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub crl_count: usize,
    /// Serial numbers (hex) every CRL in force revokes, to audit what a reload adds.
    pub revoked: std::collections::BTreeSet<String>,
}

pub fn load(edge: &EdgeConfig) -> Result<TlsMaterial, TlsError> {
    let provider = Arc::new(ring::default_provider());

    let mut roots = RootCertStore::empty();
    for ca in cert::load_certs(&edge.ca)? {
        roots.add(ca).map_err(|e| TlsError::BadCa {
            path: edge.ca.clone(),
            detail: e.to_string(),
        })?;
    }

    let crls = match &edge.crl {
        Some(path) => {
            let crls = cert::load_crls(path)?;
            warn_if_stale(path, &crls);
            crls
        }
        None => Vec::new(),
    };
    let crl_count = crls.len();
    let revoked = revoked_serials(&crls);

    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;

    let chain = cert::load_certs(&edge.cert)?;
    let key = cert::load_key(&edge.key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::ServerCert(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::ServerCert(e.to_string()))?;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;

    Ok(TlsMaterial {
        server_config: Arc::new(config),
        verifier,
        crl_count,
        revoked,
    })
}

fn revoked_serials(
    crls: &[CertificateRevocationListDer<'_>],
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for der in crls {
        if let Ok((_, crl)) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
        {
            out.extend(
                crl.iter_revoked_certificates()
                    .map(|r| hex::encode(r.raw_serial())),
            );
        }
    }
    out
}

fn warn_if_stale(path: &std::path::Path, crls: &[CertificateRevocationListDer<'_>]) {
    let now = x509_parser::time::ASN1Time::now();
    for der in crls {
        if let Ok((_, crl)) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
        {
            if crl.next_update().is_some_and(|next| next < now) {
                tracing::warn!(
                    event = "edge.crl_stale",
                    path = %path.display(),
                    "CRL is past its nextUpdate; issue a fresh one with `wardgate pki revoke` or re-sign"
                );
            }
        }
    }
}
