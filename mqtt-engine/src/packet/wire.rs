//! The data types of MQTT section 1.5: integers, variable byte integers,
//! UTF-8 strings and binary data, read with bounds checks (a short packet is
//! a malformed packet, never a panic) and written into a `BytesMut`.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, ReasonCode};

/// The largest value a variable byte integer holds (four bytes).
pub const MAX_VARINT: u32 = 268_435_455;

/// A cursor over one packet's bytes.
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

fn malformed(what: &'static str) -> DecodeError {
    DecodeError::new(ReasonCode::MALFORMED_PACKET, what)
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(malformed(what));
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(b);
        Ok(u64::from_be_bytes(bytes))
    }

    /// A variable byte integer (MQTT 1.5.5): at most four bytes.
    pub fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8(what)?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a variable byte integer longer than four bytes"))
    }

    /// Binary data: a two-byte length, then the bytes (zero-copy).
    pub fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(what)?);
        if self.remaining() < len {
            return Err(malformed(what));
        }
        let bytes = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(bytes)
    }

    /// A UTF-8 string: well-formed, and without U+0000 (MQTT-1.5.4-1, -2).
    pub fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.binary(what)?;
        let s = std::str::from_utf8(&bytes).map_err(|_| malformed("a string that is not UTF-8"))?;
        if s.contains('\0') {
            return Err(malformed("a string containing U+0000"));
        }
        Ok(s.to_owned())
    }

    /// Everything left, zero-copy (a PUBLISH payload).
    pub fn rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        rest
    }

    /// A sub-reader over the next `len` bytes (a property list).
    pub fn sub(&mut self, len: usize, what: &'static str) -> Result<Reader, DecodeError> {
        if self.remaining() < len {
            return Err(malformed(what));
        }
        let sub = Reader::new(self.buf.slice(self.pos..self.pos + len));
        self.pos += len;
        Ok(sub)
    }
}

pub fn put_varint(buf: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// Writes a string; MQTT strings are at most 65535 bytes, and every string
/// the broker writes came in as one or was checked as a topic.
pub fn put_string(buf: &mut BytesMut, s: &str) {
    put_binary(buf, s.as_bytes());
}

pub fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    let len = b.len().min(usize::from(u16::MAX));
    buf.put_u16(len as u16);
    buf.put_slice(&b[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_byte_integers_round_trip_at_every_boundary() {
        // The boundaries of the table in MQTT 1.5.5.
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (MAX_VARINT, 4),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), len, "{value}");
            assert_eq!(Reader::new(buf.freeze()).varint("v").unwrap(), value);
        }
    }

    #[test]
    fn a_five_byte_variable_integer_is_malformed() {
        let err = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x7f])).varint("v").unwrap_err();
        assert_eq!(err.reason, ReasonCode::MALFORMED_PACKET);
    }

    #[test]
    fn strings_must_be_utf8_without_nul() {
        // MQTT-1.5.4-1 and MQTT-1.5.4-2.
        let bad_utf8 = Bytes::from_static(&[0, 2, 0xc3, 0x28]);
        assert!(Reader::new(bad_utf8).string("s").is_err());
        let nul = Bytes::from_static(&[0, 3, b'a', 0, b'b']);
        assert!(Reader::new(nul).string("s").is_err());
        let ok = Bytes::from_static(&[0, 3, b'a', b'/', b'b']);
        assert_eq!(Reader::new(ok).string("s").unwrap(), "a/b");
    }

    #[test]
    fn a_length_beyond_the_packet_is_malformed_not_a_panic() {
        assert!(Reader::new(Bytes::from_static(&[0, 9, b'a'])).binary("b").is_err());
        assert!(Reader::new(Bytes::from_static(&[1])).u16("n").is_err());
        assert!(Reader::new(Bytes::from_static(&[])).u8("n").is_err());
    }
}
