//! Spool records: their key, their plaintext encoding, and their encryption at rest.
//!
//! Key (16 bytes would be wasteful; 9 suffice): `priority (1 byte) ‖ sequence (u64 BE)`, so
//! that sled's key order is the drain order: alarms first, then vitals, then routine, each
//! oldest first.
//!
//! Value, format version [`RECORD_VERSION`] (2; version 1, without the properties, is
//! still read):
//!
//! ```text
//! version (1) ‖ nonce (12) ‖ ChaCha20-Poly1305( plaintext ) with the key bytes as AAD
//! plaintext = qos (1) ‖ received_at_ms (u64 BE) ‖ device_len (u16 BE) ‖ device
//!           ‖ topic_len (u16 BE) ‖ topic ‖ props_len (u32 BE) ‖ props ‖ payload
//! props     = empty (props_len 0), or
//!             flags (1: 1 = UTF-8 payload, 2 = content type, 4 = expiry)
//!           ‖ [expiry_secs (u32 BE)] ‖ [ct_len (u16 BE) ‖ content type]
//!           ‖ user_count (u16 BE) ‖ (key_len (u16 BE) ‖ key ‖ value_len (u16 BE) ‖ value)*
//! ```
//!
//! The key is the AAD, so a record moved to another key (another sequence number or
//! priority) fails to decrypt. Nonces are random (96 bits), not derived from the sequence,
//! so that a data directory restored from a backup cannot reuse a nonce under the same key.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::rand::{SecureRandom, SystemRandom};

use crate::device::DeviceId;
pub use crate::policy::Priority;

pub const RECORD_VERSION: u8 = 2;
/// The first format, written before MQTT 5 properties were kept; still read.
const RECORD_VERSION_1: u8 = 1;
pub const KEY_LEN: usize = 9;
const NONCE_LEN: usize = 12;
/// Length of the spool's encryption key file.
pub const SECRET_LEN: usize = 32;

/// Where a record lives: its priority, then its gateway sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub priority: Priority,
    pub seq: u64,
}

impl Key {
    pub fn to_bytes(self) -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        k[0] = self.priority as u8;
        k[1..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    pub fn from_bytes(b: &[u8]) -> Option<Key> {
        if b.len() != KEY_LEN {
            return None;
        }
        let priority = Priority::from_byte(b[0])?;
        let seq = u64::from_be_bytes(b[1..].try_into().ok()?);
        Some(Key { priority, seq })
    }

    /// The first key of a priority class, for range scans.
    pub fn first_of(priority: Priority) -> Key {
        Key { priority, seq: 0 }
    }
}

/// What an MQTT 5 PUBLISH carries besides topic, payload and QoS that goes upstream with
/// it. Empty for a 3.1.1 device's message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    /// Payload Format Indicator 1: the payload is UTF-8 (checked at the edge).
    pub utf8: bool,
    /// Message Expiry Interval, seconds from when the gateway received it.
    pub expiry_secs: Option<u32>,
    /// User properties, in the order the device sent them.
    pub user: Vec<(String, String)>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Bytes they take, for quotas and rates.
    pub fn len(&self) -> usize {
        self.content_type.as_ref().map_or(0, String::len)
            + self
                .user
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A message as the spool keeps it (decrypted).
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    pub device: DeviceId,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub received_at_ms: u64,
    /// An MQTT 5 device's properties; empty otherwise.
    pub properties: Properties,
}

impl std::fmt::Debug for Record {
    // Payloads may be patient data: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("device", &self.device)
            .field("topic", &self.topic)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .field("qos", &self.qos)
            .field("received_at_ms", &self.received_at_ms)
            .field(
                "properties",
                &format_args!("<{} bytes>", self.properties.len()),
            )
            .finish()
    }
}

/// Why a stored value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record has format version {0}; this wardgate reads versions 1 to {RECORD_VERSION}")]
    Version(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record fails authentication (corrupt, moved, or another key)")]
    Authentication,
    #[error("record plaintext is malformed: {0}")]
    Malformed(&'static str),
    #[error("no randomness for a nonce")]
    Random,
}

/// The spool's AEAD key. Its `Debug` shows nothing of it.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    pub fn new(secret: &[u8; SECRET_LEN]) -> Sealer {
        // A 32-byte key is always accepted by ChaCha20-Poly1305.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, secret).expect("32-byte key");
        Sealer {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// A fresh random secret for a new spool.
    pub fn generate_secret() -> Result<[u8; SECRET_LEN], RecordError> {
        let mut s = [0u8; SECRET_LEN];
        SystemRandom::new()
            .fill(&mut s)
            .map_err(|_| RecordError::Random)?;
        Ok(s)
    }

    pub fn seal(&self, key: Key, record: &Record) -> Result<Vec<u8>, RecordError> {
        let device = record.device.as_str().as_bytes();
        let topic = record.topic.as_bytes();
        let props = encode_properties(&record.properties)?;
        let mut buf = BytesMut::with_capacity(
            1 + NONCE_LEN
                + 1
                + 8
                + 2
                + device.len()
                + 2
                + topic.len()
                + 4
                + props.len()
                + record.payload.len()
                + 16,
        );
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| RecordError::Random)?;
        buf.put_u8(RECORD_VERSION);
        buf.put_slice(&nonce);
        let header = buf.len();
        buf.put_u8(record.qos);
        buf.put_u64(record.received_at_ms);
        buf.put_u16(u16::try_from(device.len()).map_err(|_| RecordError::Malformed("device"))?);
        buf.put_slice(device);
        buf.put_u16(u16::try_from(topic.len()).map_err(|_| RecordError::Malformed("topic"))?);
        buf.put_slice(topic);
        buf.put_u32(u32::try_from(props.len()).map_err(|_| RecordError::Malformed("properties"))?);
        buf.put_slice(&props);
        buf.put_slice(&record.payload);
        let mut plaintext = buf.split_off(header);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.to_bytes()),
                &mut plaintext,
            )
            .map_err(|_| RecordError::Authentication)?;
        buf.unsplit(plaintext);
        buf.put_slice(tag.as_ref());
        Ok(buf.to_vec())
    }

    pub fn open(&self, key: Key, value: &[u8]) -> Result<Record, RecordError> {
        let (&version, rest) = value.split_first().ok_or(RecordError::Truncated)?;
        if version != RECORD_VERSION && version != RECORD_VERSION_1 {
            return Err(RecordError::Version(version));
        }
        if rest.len() < NONCE_LEN + aead::MAX_TAG_LEN {
            return Err(RecordError::Truncated);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| RecordError::Truncated)?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(key.to_bytes()), &mut sealed)
            .map_err(|_| RecordError::Authentication)?;
        decode(plain, version)
    }
}

/// The properties block of a version 2 record (empty for none).
fn encode_properties(p: &Properties) -> Result<Vec<u8>, RecordError> {
    let mut b = Vec::new();
    if p.is_empty() {
        return Ok(b);
    }
    let short = |s: &str| u16::try_from(s.len()).map_err(|_| RecordError::Malformed("properties"));
    let flags = u8::from(p.utf8)
        | if p.content_type.is_some() { 2 } else { 0 }
        | if p.expiry_secs.is_some() { 4 } else { 0 };
    b.put_u8(flags);
    if let Some(e) = p.expiry_secs {
        b.put_u32(e);
    }
    if let Some(ct) = &p.content_type {
        b.put_u16(short(ct)?);
        b.put_slice(ct.as_bytes());
    }
    b.put_u16(u16::try_from(p.user.len()).map_err(|_| RecordError::Malformed("properties"))?);
    for (k, v) in &p.user {
        b.put_u16(short(k)?);
        b.put_slice(k.as_bytes());
        b.put_u16(short(v)?);
        b.put_slice(v.as_bytes());
    }
    Ok(b)
}

fn decode_properties(mut b: &[u8]) -> Result<Properties, RecordError> {
    let bad = RecordError::Malformed("properties");
    let mut p = Properties::default();
    if b.is_empty() {
        return Ok(p);
    }
    let string = |b: &mut &[u8]| -> Result<String, RecordError> {
        if b.remaining() < 2 {
            return Err(RecordError::Malformed("properties"));
        }
        let n = usize::from(b.get_u16());
        if b.remaining() < n {
            return Err(RecordError::Malformed("properties"));
        }
        let s = std::str::from_utf8(&b[..n])
            .map_err(|_| RecordError::Malformed("properties"))?
            .to_owned();
        b.advance(n);
        Ok(s)
    };
    let flags = b.get_u8();
    p.utf8 = flags & 1 != 0;
    if flags & 4 != 0 {
        if b.remaining() < 4 {
            return Err(bad);
        }
        p.expiry_secs = Some(b.get_u32());
    }
    if flags & 2 != 0 {
        p.content_type = Some(string(&mut b)?);
    }
    if b.remaining() < 2 {
        return Err(bad);
    }
    let n = b.get_u16();
    for _ in 0..n {
        let k = string(&mut b)?;
        let v = string(&mut b)?;
        p.user.push((k, v));
    }
    if b.has_remaining() {
        return Err(bad);
    }
    Ok(p)
}

fn decode(plain: &[u8], version: u8) -> Result<Record, RecordError> {
    let mut b = plain;
    let need = |b: &[u8], n: usize| {
        if b.remaining() < n {
            Err(RecordError::Malformed("short"))
        } else {
            Ok(())
        }
    };
    need(b, 1 + 8 + 2)?;
    let qos = b.get_u8();
    let received_at_ms = b.get_u64();
    let dlen = usize::from(b.get_u16());
    need(b, dlen + 2)?;
    let device = std::str::from_utf8(&b[..dlen]).map_err(|_| RecordError::Malformed("device"))?;
    let device = DeviceId::parse_stored(device).map_err(|_| RecordError::Malformed("device"))?;
    b.advance(dlen);
    let tlen = usize::from(b.get_u16());
    need(b, tlen)?;
    let topic = std::str::from_utf8(&b[..tlen])
        .map_err(|_| RecordError::Malformed("topic"))?
        .to_owned();
    b.advance(tlen);
    let mut properties = Properties::default();
    if version >= RECORD_VERSION {
        need(b, 4)?;
        let plen = b.get_u32() as usize;
        need(b, plen)?;
        properties = decode_properties(&b[..plen])?;
        b.advance(plen);
    }
    Ok(Record {
        device,
        topic,
        payload: Bytes::copy_from_slice(b),
        qos,
        received_at_ms,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            device: DeviceId::parse("pump-1").unwrap(),
            topic: "ward/pump-1/vitals".into(),
            payload: Bytes::from_static(b"PATIENT-MARKER hr=72"),
            qos: 1,
            received_at_ms: 1_700_000_000_123,
            properties: Properties::default(),
        }
    }

    fn with_properties() -> Record {
        Record {
            properties: Properties {
                content_type: Some("application/fhir+json".into()),
                utf8: true,
                expiry_secs: Some(90),
                user: vec![
                    ("unit".into(), "mmHg".into()),
                    ("unit".into(), "kPa".into()),
                ],
            },
            ..record()
        }
    }

    /// A version 1 value as wardgate before record version 2 sealed it.
    fn seal_v1(s: &Sealer, key: Key, r: &Record) -> Vec<u8> {
        let mut plain = Vec::new();
        plain.put_u8(r.qos);
        plain.put_u64(r.received_at_ms);
        plain.put_u16(r.device.as_str().len() as u16);
        plain.put_slice(r.device.as_str().as_bytes());
        plain.put_u16(r.topic.len() as u16);
        plain.put_slice(r.topic.as_bytes());
        plain.put_slice(&r.payload);
        let nonce = [3u8; NONCE_LEN];
        let tag = s
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.to_bytes()),
                &mut plain,
            )
            .unwrap();
        let mut v = vec![1u8];
        v.extend_from_slice(&nonce);
        v.extend_from_slice(&plain);
        v.extend_from_slice(tag.as_ref());
        v
    }

    #[test]
    fn properties_round_trip_and_version_1_records_are_still_read() {
        let s = Sealer::new(&Sealer::generate_secret().unwrap());
        let key = Key {
            priority: Priority::Alarm,
            seq: 3,
        };
        let sealed = s.seal(key, &with_properties()).unwrap();
        assert_eq!(sealed[0], 2);
        assert!(
            !sealed.windows(4).any(|w| w == b"mmHg"),
            "properties are sealed too"
        );
        assert_eq!(s.open(key, &sealed).unwrap(), with_properties());
        let old = seal_v1(&s, key, &record());
        assert_eq!(s.open(key, &old).unwrap(), record());
    }

    #[test]
    fn round_trip_and_no_plaintext() {
        let s = Sealer::new(&Sealer::generate_secret().unwrap());
        let key = Key {
            priority: Priority::Vital,
            seq: 42,
        };
        let sealed = s.seal(key, &record()).unwrap();
        assert_eq!(sealed[0], RECORD_VERSION);
        assert!(!sealed.windows(14).any(|w| w == b"PATIENT-MARKER"));
        assert!(!sealed.windows(6).any(|w| w == b"pump-1"));
        assert_eq!(s.open(key, &sealed).unwrap(), record());
    }

    #[test]
    fn tampering_moving_and_other_keys_fail() {
        let s = Sealer::new(&Sealer::generate_secret().unwrap());
        let key = Key {
            priority: Priority::Alarm,
            seq: 7,
        };
        let sealed = s.seal(key, &record()).unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(s.open(key, &bad).is_err(), "bit flip at {i} went unnoticed");
        }
        let moved = Key {
            priority: Priority::Routine,
            seq: 7,
        };
        assert_eq!(s.open(moved, &sealed), Err(RecordError::Authentication));
        let other = Sealer::new(&Sealer::generate_secret().unwrap());
        assert_eq!(other.open(key, &sealed), Err(RecordError::Authentication));
        assert_eq!(s.open(key, &sealed[..10]), Err(RecordError::Truncated));
        let mut v3 = sealed.clone();
        v3[0] = 3;
        assert_eq!(s.open(key, &v3), Err(RecordError::Version(3)));
    }

    #[test]
    fn key_order_is_drain_order() {
        let a = Key {
            priority: Priority::Alarm,
            seq: 900,
        }
        .to_bytes();
        let v = Key {
            priority: Priority::Vital,
            seq: 1,
        }
        .to_bytes();
        let r1 = Key {
            priority: Priority::Routine,
            seq: 1,
        }
        .to_bytes();
        let r2 = Key {
            priority: Priority::Routine,
            seq: 256,
        }
        .to_bytes();
        assert!(a < v && v < r1 && r1 < r2);
        assert_eq!(
            Key::from_bytes(&r2),
            Some(Key {
                priority: Priority::Routine,
                seq: 256
            })
        );
        assert_eq!(Key::from_bytes(&[9, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }
}
