//! Reading certificates, keys and CRLs from PEM files, and the device id of a certificate.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::device::{DeviceId, DeviceIdError};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid PEM: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_err(path: &Path, e: impl std::fmt::Display) -> PemError {
    PemError::Parse {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Every certificate in a PEM file, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(path, e))?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Empty {
            path: path.to_owned(),
            what: "private key",
        },
        e => parse_err(path, e),
    })
}

/// Every CRL in a PEM file (possibly none: an empty file means nothing is revoked).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    let bytes = read(path)?;
    CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(path, e))
}

/// Why a certificate does not name a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdError {
    #[error("certificate cannot be parsed")]
    Unparsable,
    #[error("certificate subject has no common name")]
    NoCommonName,
    #[error("certificate subject has more than one common name")]
    SeveralCommonNames,
    #[error("certificate common name is not a string")]
    NotAString,
    #[error("certificate common name is not a valid device id: {0}")]
    BadDeviceId(#[from] DeviceIdError),
}

/// The device id named by a certificate: its subject's single Common Name.
pub fn device_id(cert: &CertificateDer<'_>) -> Result<DeviceId, CertIdError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|_| CertIdError::Unparsable)?;
    let mut cns = x509.subject().iter_common_name();
    let cn = cns.next().ok_or(CertIdError::NoCommonName)?;
    if cns.next().is_some() {
        return Err(CertIdError::SeveralCommonNames);
    }
    let cn = cn.as_str().map_err(|_| CertIdError::NotAString)?;
    Ok(DeviceId::parse(cn)?)
}

/// The serial number of a certificate, as lower-case hex of its DER integer bytes.
pub fn serial_hex(cert: &CertificateDer<'_>) -> Result<String, CertIdError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|_| CertIdError::Unparsable)?;
    Ok(hex::encode(x509.raw_serial()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with(cns: &[&str]) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for cn in cns {
            p.distinguished_name.push(DnType::CommonName, *cn);
        }
        p.distinguished_name
            .push(DnType::OrganizationName, "pump-9");
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn cn_is_the_device_id() {
        assert_eq!(
            device_id(&cert_with(&["pump-1"])).unwrap().as_str(),
            "pump-1"
        );
    }

    #[test]
    fn cn_must_be_single_and_valid() {
        assert_eq!(device_id(&cert_with(&[])), Err(CertIdError::NoCommonName));
        assert!(matches!(
            device_id(&cert_with(&["ward/#"])),
            Err(CertIdError::BadDeviceId(_))
        ));
        assert_eq!(
            device_id(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(CertIdError::Unparsable)
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{path}: CA certificate refused: {detail}")]
    Ca { path: PathBuf, detail: String },
    #[error("client certificate or key refused: {0}")]
    Identity(String),
}

/// A TLS client configuration (ring, TLS 1.2+) that trusts the CAs in `ca` and presents the
/// certificate chain in `cert` with the key in `key`. Used by the demo's simulated devices
/// and by clients of the gateway in tests.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<std::sync::Arc<rustls::ClientConfig>, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| ClientTlsError::Ca {
            path: ca.to_owned(),
            detail: e.to_string(),
        })?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientTlsError::Identity(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| ClientTlsError::Identity(e.to_string()))?;
    Ok(std::sync::Arc::new(config))
}
