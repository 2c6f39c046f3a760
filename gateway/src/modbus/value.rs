//! Register maps: what a register holds and how its words become a value. Pure.

use std::fmt;

pub use crate::config::modbus::{Function, ValueType, WordOrder};

/// The bytes of `words` as one big-endian number.
fn bytes(words: &[u16], order: WordOrder) -> Vec<u8> {
    let mut w: Vec<u16> = words.to_vec();
    if order == WordOrder::Little {
        w.reverse();
    }
    w.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// A decoded value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Number(f64),
    Bool(bool),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Decodes the raw words of one register entry (before scale and offset).
pub fn decode(t: ValueType, order: WordOrder, words: &[u16]) -> Option<f64> {
    if words.len() != usize::from(t.width()) {
        return None;
    }
    let b = bytes(words, order);
    Some(match t {
        ValueType::U16 => f64::from(words[0]),
        ValueType::I16 => f64::from(words[0] as i16),
        ValueType::U32 => f64::from(u32::from_be_bytes(b.try_into().ok()?)),
        ValueType::I32 => f64::from(i32::from_be_bytes(b.try_into().ok()?)),
        ValueType::F32 => f64::from(f32::from_be_bytes(b.try_into().ok()?)),
        ValueType::F64 => f64::from_be_bytes(b.try_into().ok()?),
        ValueType::Bool => return None,
    })
}

/// Why a value cannot be written to a register.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("{raw} does not fit a {ty:?} register")]
    DoesNotFit { raw: f64, ty: ValueType },
    #[error("a bool is a coil, not a register")]
    Coil,
}

/// The words that hold `raw` (after undoing scale and offset), or why they cannot.
pub fn encode(t: ValueType, order: WordOrder, raw: f64) -> Result<Vec<u16>, EncodeError> {
    let int = |min: f64, max: f64| -> Result<f64, EncodeError> {
        let r = raw.round();
        if (raw - r).abs() > 1e-9 || r < min || r > max {
            Err(EncodeError::DoesNotFit { raw, ty: t })
        } else {
            Ok(r)
        }
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let be: Vec<u8> = match t {
        ValueType::U16 => (int(0.0, 65535.0)? as u16).to_be_bytes().to_vec(),
        ValueType::I16 => (int(-32768.0, 32767.0)? as i16).to_be_bytes().to_vec(),
        ValueType::U32 => (int(0.0, 4_294_967_295.0)? as u32).to_be_bytes().to_vec(),
        ValueType::I32 => (int(-2_147_483_648.0, 2_147_483_647.0)? as i32)
            .to_be_bytes()
            .to_vec(),
        ValueType::F32 => (raw as f32).to_be_bytes().to_vec(),
        ValueType::F64 => raw.to_be_bytes().to_vec(),
        ValueType::Bool => return Err(EncodeError::Coil),
    };
    let mut words: Vec<u16> = be
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect();
    if order == WordOrder::Little {
        words.reverse();
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_and_word_order_round_trips() {
        for (t, v) in [
            (ValueType::U16, 65535.0),
            (ValueType::I16, -1234.0),
            (ValueType::U32, 4_000_000_000.0),
            (ValueType::I32, -2_000_000_000.0),
            (ValueType::F32, 21.5),
            (ValueType::F64, -0.000_123_456_789),
        ] {
            for order in [WordOrder::Big, WordOrder::Little] {
                let words = encode(t, order, v).unwrap();
                assert_eq!(words.len(), usize::from(t.width()));
                assert_eq!(decode(t, order, &words), Some(v), "{t:?} {order:?}");
            }
        }
    }

    #[test]
    fn word_order_is_the_order_of_words() {
        // 0x0001_0002 big: [1, 2]; little: [2, 1].
        assert_eq!(
            decode(ValueType::U32, WordOrder::Big, &[1, 2]),
            Some(65538.0)
        );
        assert_eq!(
            decode(ValueType::U32, WordOrder::Little, &[2, 1]),
            Some(65538.0)
        );
        assert_eq!(
            decode(ValueType::I16, WordOrder::Big, &[0xffff]),
            Some(-1.0)
        );
        assert!(encode(ValueType::U16, WordOrder::Big, 70000.0).is_err());
        assert!(encode(ValueType::I16, WordOrder::Big, 1.5).is_err());
    }
}
