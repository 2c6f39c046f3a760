//! The site PKI: a device CA, the gateway's server certificate, device certificates and a
//! CRL, all made here with rcgen (ECDSA P-256).
//!
//! Layout of a PKI directory (`wardgate pki init --dir DIR`):
//!
//! | file         | what                                                   | mode |
//! |--------------|--------------------------------------------------------|------|
//! | `ca.pem`     | the site's device CA certificate (trust anchor)        | 0644 |
//! | `ca.key`     | its private key                                        | 0600 |
//! | `server.pem` | the gateway's TLS server certificate, signed by the CA | 0644 |
//! | `server.key` | its private key                                        | 0600 |
//! | `crl.pem`    | the CA's current CRL (empty list at init)              | 0644 |
//! | `index.toml` | every certificate issued, by device, with revocations  | 0600 |
//!
//! Invariants: keys are generated on the machine that runs the command and written 0600 with
//! `create_new` or an atomic rename, never logged; `init` never overwrites an existing CA;
//! the CRL number only grows; every file is replaced atomically, so a gateway reloading the
//! CRL never reads half a file. Device certificates carry only the clientAuth usage and the
//! server certificate only serverAuth, so neither can stand in for the other.
//!
//! Tested by the unit tests below and by the system tests, which build every PKI they use
//! with these commands.

pub mod cert;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::device::DeviceId;

/// Version of `index.toml`; bumped on any incompatible change.
pub const INDEX_VERSION: u32 = 1;
pub const CA_LIFETIME_DAYS: i64 = 3650;
pub const SERVER_LIFETIME_DAYS: i64 = 825;
pub const DEFAULT_DEVICE_LIFETIME_DAYS: i64 = 365;
/// How far the CRL's nextUpdate lies ahead. The edge does not refuse devices when it has
/// passed (a stale CRL must not take a ward offline); it warns instead.
pub const CRL_LIFETIME_DAYS: i64 = 365;
/// Backdating of notBefore, to tolerate clocks a little behind.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// Names always in the server certificate, so local tools and tests can reach the edge.
pub const LOOPBACK_SANS: &[&str] = &["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a site CA already exists in {0}; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    #[error("{0} holds no site PKI (run `wardgate pki init` first)")]
    NotInitialised(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path} is not a valid PKI index: {detail}")]
    Index { path: PathBuf, detail: String },
    #[error("{path} has index version {found}; this wardgate reads version {INDEX_VERSION}")]
    IndexVersion { path: PathBuf, found: u32 },
    #[error("invalid subject alternative name {0:?}")]
    BadSan(String),
    #[error("no certificate was issued to device {0}")]
    UnknownDevice(DeviceId),
    #[error("every certificate of device {0} is already revoked")]
    AlreadyRevoked(DeviceId),
    #[error(transparent)]
    Cert(#[from] cert::CertIdError),
    #[error("lifetime must be between 1 and {max} days")]
    BadLifetime { max: i64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    pub dir: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    pub fn index(&self) -> PathBuf {
        self.dir.join("index.toml")
    }
}

/// The record of every certificate this CA issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub version: u32,
    pub site: String,
    /// Number of the last CRL written.
    pub crl_number: u64,
    #[serde(default, rename = "cert")]
    pub certs: Vec<IssuedCert>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCert {
    pub device: String,
    /// Hex of the DER serial number.
    pub serial: String,
    pub issued_at_unix: i64,
    pub not_after_unix: i64,
    pub revoked_at_unix: Option<i64>,
}

/// The device a certificate serial (hex) was issued to, from the index in `dir`, if the
/// index is there and names it.
pub fn device_of_serial(dir: &Path, serial: &str) -> Option<String> {
    let index = Index::load(&PkiDir::new(dir).index()).ok()?;
    index
        .certs
        .into_iter()
        .find(|c| c.serial.eq_ignore_ascii_case(serial))
        .map(|c| c.device)
}

impl Index {
    fn load(path: &Path) -> Result<Index, PkiError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PkiError::NotInitialised(path.parent().unwrap_or(path).to_owned())
            } else {
                PkiError::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = toml::from_str(&text).map_err(|e| PkiError::Index {
            path: path.to_owned(),
            detail: e.message().to_owned(),
        })?;
        if v.version != INDEX_VERSION {
            return Err(PkiError::IndexVersion {
                path: path.to_owned(),
                found: v.version,
            });
        }
        toml::from_str(&text).map_err(|e| PkiError::Index {
            path: path.to_owned(),
            detail: e.message().to_owned(),
        })
    }

    fn save(&self, path: &Path) -> Result<(), PkiError> {
        let text = toml::to_string(self).map_err(|e| PkiError::Index {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes(), 0o600)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`, synced.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    // The umask may have narrowed the mode further; make it exact.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn dn(cn: &str, site: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, site);
    dn.push(DnType::OrganizationalUnitName, unit);
    dn
}

fn load_issuer(pki: &PkiDir) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_path = pki.ca_key();
    if !key_path.exists() {
        return Err(PkiError::NotInitialised(pki.dir.clone()));
    }
    let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
    let cert_path = pki.ca_cert();
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let key = KeyPair::from_pem(&key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
}

/// What `init` made.
#[derive(Debug)]
pub struct InitReport {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub crl: PathBuf,
    pub server_names: Vec<String>,
}

/// Creates the site CA, the gateway's server certificate and an empty CRL in `pki.dir`.
pub fn init(
    pki: &PkiDir,
    site: &str,
    gateway_id: &str,
    extra_sans: &[String],
) -> Result<InitReport, PkiError> {
    std::fs::create_dir_all(&pki.dir).map_err(io_err(&pki.dir))?;
    if pki.ca_key().exists() || pki.ca_cert().exists() {
        return Err(PkiError::AlreadyInitialised(pki.dir.clone()));
    }
    let start = now() - CLOCK_SKEW;

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = dn(&format!("{site} wardgate device CA"), site, "wardgate");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = start;
    ca.not_after = start + Duration::days(CA_LIFETIME_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names: Vec<String> = extra_sans.to_vec();
    names.extend(LOOPBACK_SANS.iter().map(|s| s.to_string()));
    names.dedup();
    let mut server = CertificateParams::default();
    server.distinguished_name = dn(gateway_id, site, "wardgate gateway");
    server.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| PkiError::BadSan(n.clone())),
        })
        .collect::<Result<_, _>>()?;
    server.is_ca = IsCa::ExplicitNoCa;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = start;
    server.not_after = start + Duration::days(SERVER_LIFETIME_DAYS);
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let server_cert = server.signed_by(&server_key, &issuer)?;

    // Private keys first: if anything below fails, no CA certificate exists without its key.
    write_atomic(
        &pki.ca_key(),
        issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(
        &pki.server_key(),
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&pki.server_cert(), server_cert.pem().as_bytes(), 0o644)?;
    write_atomic(&pki.ca_cert(), ca_cert.pem().as_bytes(), 0o644)?;
    let index = Index {
        version: INDEX_VERSION,
        site: site.to_owned(),
        crl_number: 0,
        certs: Vec::new(),
    };
    write_crl(pki, &issuer, index)?;
    Ok(InitReport {
        ca: pki.ca_cert(),
        server_cert: pki.server_cert(),
        crl: pki.crl(),
        server_names: names,
    })
}

/// Files of an issued device certificate.
#[derive(Debug)]
pub struct IssueReport {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// Issues a client certificate with CN = `device` into `out/{device}.pem` and `.key`, and
/// copies the CA certificate to `out/ca.pem` for the device to verify the gateway with.
pub fn issue(
    pki: &PkiDir,
    device: &DeviceId,
    out: &Path,
    lifetime_days: i64,
) -> Result<IssueReport, PkiError> {
    if !(1..=CA_LIFETIME_DAYS).contains(&lifetime_days) {
        return Err(PkiError::BadLifetime {
            max: CA_LIFETIME_DAYS,
        });
    }
    let mut index = Index::load(&pki.index())?;
    let issuer = load_issuer(pki)?;
    let start = now() - CLOCK_SKEW;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(device.as_str(), &index.site, "wardgate device");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = start;
    params.not_after = start + Duration::days(lifetime_days);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    let serial = cert::serial_hex(cert.der())?;

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let report = IssueReport {
        cert: out.join(format!("{device}.pem")),
        key: out.join(format!("{device}.key")),
        ca: out.join("ca.pem"),
        serial: serial.clone(),
        not_after: params.not_after,
    };
    write_atomic(&report.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&report.cert, cert.pem().as_bytes(), 0o644)?;
    let ca_pem = std::fs::read(pki.ca_cert()).map_err(io_err(&pki.ca_cert()))?;
    write_atomic(&report.ca, &ca_pem, 0o644)?;

    index.certs.push(IssuedCert {
        device: device.to_string(),
        serial,
        issued_at_unix: now().unix_timestamp(),
        not_after_unix: params.not_after.unix_timestamp(),
        revoked_at_unix: None,
    });
    index.save(&pki.index())?;
    Ok(report)
}

/// Revokes every unrevoked certificate of `device` and writes a new CRL. Returns the serial
/// numbers revoked.
pub fn revoke(pki: &PkiDir, device: &DeviceId) -> Result<Vec<String>, PkiError> {
    let mut index = Index::load(&pki.index())?;
    let issuer = load_issuer(pki)?;
    let when = now().unix_timestamp();
    let mut revoked = Vec::new();
    let mut any = false;
    for c in index
        .certs
        .iter_mut()
        .filter(|c| c.device == device.as_str())
    {
        any = true;
        if c.revoked_at_unix.is_none() {
            c.revoked_at_unix = Some(when);
            revoked.push(c.serial.clone());
        }
    }
    if !any {
        return Err(PkiError::UnknownDevice(device.clone()));
    }
    if revoked.is_empty() {
        return Err(PkiError::AlreadyRevoked(device.clone()));
    }
    write_crl(pki, &issuer, index)?;
    Ok(revoked)
}

/// Signs a CRL listing every revoked certificate of `index` with the next CRL number, and
/// saves the index before the CRL so the number never goes back.
fn write_crl(pki: &PkiDir, issuer: &Issuer<'_, KeyPair>, mut index: Index) -> Result<(), PkiError> {
    index.crl_number += 1;
    let this_update = now();
    let revoked_certs = index
        .certs
        .iter()
        .filter_map(|c| {
            let at = c.revoked_at_unix?;
            let serial = hex::decode(&c.serial).ok()?;
            Some(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(this_update),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update,
        next_update: this_update + Duration::days(CRL_LIFETIME_DAYS),
        crl_number: SerialNumber::from(index.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer)?;
    index.save(&pki.index())?;
    write_atomic(&pki.crl(), crl.pem()?.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn init_issue_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        let report = init(&pki, "st-mary", "gw-1", &["gw-1.ward7.example".into()]).unwrap();
        assert!(report.server_names.contains(&"127.0.0.1".to_string()));
        for key in [pki.ca_key(), pki.server_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(
            init(&pki, "st-mary", "gw-1", &[]),
            Err(PkiError::AlreadyInitialised(_))
        ));

        let dev = DeviceId::parse("pump-1").unwrap();
        let out = dir.path().join("devices");
        let issued = issue(&pki, &dev, &out, 30).unwrap();
        let cert = &cert::load_certs(&issued.cert).unwrap()[0];
        assert_eq!(cert::device_id(cert).unwrap(), dev);
        assert_eq!(cert::serial_hex(cert).unwrap(), issued.serial);
        let mode = std::fs::metadata(&issued.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        assert!(cert::load_crls(&pki.crl()).unwrap().len() == 1);
        let revoked = revoke(&pki, &dev).unwrap();
        assert_eq!(revoked, vec![issued.serial.clone()]);
        assert!(matches!(
            revoke(&pki, &dev),
            Err(PkiError::AlreadyRevoked(_))
        ));
        let other = DeviceId::parse("pump-2").unwrap();
        assert!(matches!(
            revoke(&pki, &other),
            Err(PkiError::UnknownDevice(_))
        ));
        let index = Index::load(&pki.index()).unwrap();
        assert_eq!(index.crl_number, 2);

        // The CRL really lists the serial.
        let crl_der = cert::load_crls(&pki.crl()).unwrap().remove(0);
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der.as_ref())
                .unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec![issued.serial]);
    }

    #[test]
    fn index_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        init(&pki, "s", "gw", &[]).unwrap();
        let text = std::fs::read_to_string(pki.index()).unwrap();
        std::fs::write(pki.index(), text.replace("version = 1", "version = 9")).unwrap();
        let dev = DeviceId::parse("d").unwrap();
        assert!(matches!(
            issue(&pki, &dev, dir.path(), 1),
            Err(PkiError::IndexVersion { found: 9, .. })
        ));
    }
}
