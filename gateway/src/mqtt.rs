//! Framing MQTT packets on a byte stream with rumqttc's `mqttbytes` codec (the fixed header
//! is the same in 3.1.1 and 5), for the edge and the broker's readiness probe. Tested by
//! the unit tests below.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::{self, PacketType};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes a PUBLISH carries besides its payload, at most: topic (2 + 65535) and packet id.
pub const PUBLISH_OVERHEAD: usize = 2 + 65_535 + 2;
/// How much to read at a time.
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
}

/// Reads the next whole packet, or `None` at a clean end of stream. `max` bounds the
/// packet's remaining length and is checked from the fixed header, before the body is read.
pub async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, ReadError> {
    if read_frame(rd, buf, max).await?.is_none() {
        return Ok(None);
    }
    Packet::read(buf, max)
        .map(Some)
        .map_err(ReadError::Malformed)
}

/// Reads raw bytes until `buf` starts with one whole frame, and returns its fixed header
/// without parsing the body (the CONNECT's protocol level decides which codec applies).
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<mqttbytes::FixedHeader>, ReadError> {
    loop {
        if !buf.is_empty() {
            match mqttbytes::check(buf.iter(), max) {
                Ok(h) => return Ok(Some(h)),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                    return Err(ReadError::TooLarge { size, max })
                }
                Err(e) => return Err(ReadError::Malformed(e)),
            }
        }
        buf.reserve(READ_CHUNK);
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Truncated)
            };
        }
    }
}

/// The protocol name and level of a CONNECT frame at the start of `buf`, if it is one.
pub fn connect_protocol(buf: &[u8], header: &mqttbytes::FixedHeader) -> Option<(String, u8)> {
    if header.packet_type().ok()? != PacketType::Connect {
        return None;
    }
    // The fixed header is one type byte and 1 to 4 remaining-length bytes, the last of
    // which has its continuation bit clear.
    let len_bytes = buf.get(1..)?.iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let body = buf.get(1 + len_bytes..header.frame_length())?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let name = body.get(2..2 + name_len)?;
    let level = *body.get(2 + name_len)?;
    Some((String::from_utf8_lossy(name).into_owned(), level))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Connect;

    #[test]
    fn connect_protocol_level() {
        let mut buf = BytesMut::new();
        Connect::new("pump-1").write(&mut buf).unwrap();
        let h = mqttbytes::check(buf.iter(), 1024).unwrap();
        assert_eq!(connect_protocol(&buf, &h), Some(("MQTT".into(), 4)));
        // Level byte 5: an MQTT 5 CONNECT.
        let mut v5 = buf.clone();
        v5[2 + 2 + 4] = 5;
        assert_eq!(connect_protocol(&v5, &h), Some(("MQTT".into(), 5)));
    }

    #[tokio::test]
    async fn oversized_is_refused_from_the_header() {
        // A PUBLISH announcing 1 MiB, of which only the header arrives.
        let data: &[u8] = &[0x30, 0x80, 0x80, 0x40];
        let mut rd = data;
        let mut buf = BytesMut::new();
        let e = read_packet(&mut rd, &mut buf, 1024).await.unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::TooLarge {
                    size: 1_048_576,
                    max: 1024
                }
            ),
            "{e}"
        );
    }
}
