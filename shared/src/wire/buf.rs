//! Bounds-checked reading and length-checked writing, shared by the envelope body and the frame codec so
//! that every length prefix in the protocol is read and written the same way.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{DecodeError, EncodeError, FrameType};

/// A cursor over untrusted bytes. Every read checks the remaining length first, so no input can panic, and
/// byte fields are split off the shared buffer (`Bytes::split_to`) instead of copied.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    /// Starts reading `buf` from its first byte.
    pub(crate) const fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, needed: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < needed {
            return Err(DecodeError::Truncated {
                what,
                needed,
                available: self.buf.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }

    /// Splits off `len` bytes without copying.
    pub(crate) fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }

    /// Reads a `u16` length prefix and that many bytes.
    pub(crate) fn bytes16(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)?;
        self.bytes(usize::from(len), what)
    }

    /// Reads a `u32` length prefix and that many bytes.
    pub(crate) fn bytes32(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)?;
        // A length that does not fit usize cannot fit the buffer either.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.bytes(len, what)
    }

    /// Reads a `u16`-prefixed UTF-8 string. Validates before allocating, so bad input costs no allocation.
    pub(crate) fn str16(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.bytes16(field)?;
        utf8(&raw, field)
    }

    /// Reads a `u32`-prefixed UTF-8 string.
    pub(crate) fn str32(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let raw = self.bytes32(field)?;
        utf8(&raw, field)
    }

    /// Takes everything left, without copying.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Ends a fixed-layout frame: anything left over is an error.
    pub(crate) fn finish(self, frame: FrameType) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                frame,
                extra: self.buf.len(),
            })
        }
    }
}

fn utf8(raw: &[u8], field: &'static str) -> Result<String, DecodeError> {
    std::str::from_utf8(raw)
        .map(str::to_owned)
        .map_err(|_| DecodeError::InvalidUtf8 { field })
}

/// Writes a `u16` length prefix and the bytes, or fails before writing anything.
pub(crate) fn put_bytes16(
    buf: &mut BytesMut,
    field: &'static str,
    value: &[u8],
) -> Result<(), EncodeError> {
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::FieldTooLong {
        field,
        len: value.len(),
        max: usize::from(u16::MAX),
    })?;
    buf.put_u16(len);
    buf.put_slice(value);
    Ok(())
}

/// Writes a `u32` length prefix and the bytes, or fails before writing anything.
pub(crate) fn put_bytes32(
    buf: &mut BytesMut,
    field: &'static str,
    value: &[u8],
) -> Result<(), EncodeError> {
    let len = u32_len(value.len(), field)?;
    buf.put_u32(len);
    buf.put_slice(value);
    Ok(())
}

/// Converts a length to the `u32` the wire carries, naming the field when it does not fit.
pub(crate) fn u32_len(len: usize, field: &'static str) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::FieldTooLong {
        field,
        len,
        max: u32::MAX as usize,
    })
}
