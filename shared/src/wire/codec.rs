//! Frame encoding and the total decoder (layouts in the [module docs](super)).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::buf::{put_bytes16, put_bytes32, u32_len, Reader};
use super::{
    Capabilities, ConfigRejectReason, ConfigRejection, DecodeError, EncodeError, Frame, FrameType,
    GoAwayCode, VersionRange,
};
use crate::envelope::{Envelope, FIXED_BODY_LEN};

/// A sensible maximum frame size (1 MiB): thousands of typical messages per batch, while bounding what one
/// peer can make the other buffer.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;

/// The `u32` length prefix.
const LEN_PREFIX: usize = 4;
/// Frame type byte plus the `u32` entry count: the length of an empty `Batch`/`Downlink`.
const BATCH_HEADER: usize = 1 + 4;
/// `u64 seq` + `u32 body_len` in front of every entry body.
const ENTRY_HEADER: usize = 8 + 4;

/// Says whether `buf` starts with a whole frame, and if so how many bytes it takes (prefix included).
///
/// `max_frame_size` bounds the length prefix (type byte plus body). It is checked from the first four bytes
/// alone, so a hostile length is refused before the caller buffers any of it.
///
/// # Errors
/// [`DecodeError::Incomplete`] if more bytes are needed; [`DecodeError::FrameTooLarge`] if the prefix
/// announces more than `max_frame_size`.
pub fn check(buf: &[u8], max_frame_size: usize) -> Result<usize, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Err(DecodeError::Incomplete);
    };
    let announced = u32::from_be_bytes(*prefix);
    let len = usize::try_from(announced).unwrap_or(usize::MAX);
    if len > max_frame_size {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: max_frame_size,
        });
    }
    let total = len
        .checked_add(LEN_PREFIX)
        .ok_or(DecodeError::FrameTooLarge {
            len,
            max: max_frame_size,
        })?;
    if buf.len() < total {
        return Err(DecodeError::Incomplete);
    }
    Ok(total)
}

/// Parses one frame's contents: the type byte and the body, without the length prefix (which [`check`]
/// has consumed). Strings are validated; payloads stay slices of `contents`.
///
/// # Errors
/// Any [`DecodeError`] but `Incomplete` and `FrameTooLarge`: the contents are not a frame of this protocol.
pub fn parse(contents: Bytes) -> Result<Frame, DecodeError> {
    let mut r = Reader::new(contents);
    let frame_type = FrameType::try_from(r.u8("frame type")?)?;
    let frame = match frame_type {
        FrameType::Hello => {
            let versions = VersionRange {
                min: r.u16("Hello versions.min")?,
                max: r.u16("Hello versions.max")?,
            };
            let capabilities = Capabilities::from_bits(r.u64("Hello capabilities")?);
            let incarnation = r.u64("Hello incarnation")?;
            let last_acked = r.u64("Hello last_acked")?;
            let config_version = r.u64("Hello config_version")?;
            let agent_name = r.str16("Hello agent_name")?;
            let lane = if r.remaining() == 0 {
                0
            } else {
                r.u8("Hello lane")?
            };
            let agent_version = if r.remaining() == 0 {
                String::new()
            } else {
                r.str16("Hello agent_version")?
            };
            let window = if r.remaining() == 0 {
                0
            } else {
                r.u32("Hello window")?
            };
            // Hello may grow at the end in later versions: trailing bytes are ignored, not an error.
            return Ok(Frame::Hello {
                versions,
                capabilities,
                agent_name,
                incarnation,
                last_acked,
                config_version,
                lane,
                agent_version,
                window,
            });
        }
        FrameType::Welcome => {
            let version = r.u16("Welcome version")?;
            Frame::Welcome {
                version,
                capabilities: Capabilities::from_bits(r.u64("Welcome capabilities")?),
                max_frame_size: r.u32("Welcome max_frame_size")?,
                hub_high_water: r.u64("Welcome hub_high_water")?,
                config_version: r.u64("Welcome config_version")?,
                max_message_size: r.u32("Welcome max_message_size")?,
                max_topic_len: r.u16("Welcome max_topic_len")?,
                // The layout follows the version the Welcome names (the wire docs' version table).
                hub_version: if version >= 3 {
                    r.str16("Welcome hub_version")?
                } else {
                    String::new()
                },
            }
        }
        FrameType::Batch => Frame::Batch {
            entries: parse_entries(&mut r)?,
        },
        FrameType::Ack => Frame::Ack {
            upto: r.u64("Ack upto")?,
        },
        FrameType::ConfigPush => Frame::ConfigPush {
            version: r.u64("ConfigPush version")?,
            body: r.str32("ConfigPush body")?,
        },
        FrameType::ConfigAck => {
            let version = r.u64("ConfigAck version")?;
            let result = match r.u8("ConfigAck status")? {
                0 => Ok(()),
                1 => Err(ConfigRejection {
                    reason: ConfigRejectReason::from_code(r.u16("ConfigAck reason")?),
                    detail: r.str32("ConfigAck detail")?,
                }),
                value => {
                    return Err(DecodeError::InvalidTag {
                        what: "ConfigAck status",
                        value,
                    })
                }
            };
            Frame::ConfigAck { version, result }
        }
        FrameType::Downlink => Frame::Downlink {
            entries: parse_entries(&mut r)?,
        },
        FrameType::DownlinkAck => Frame::DownlinkAck {
            upto: r.u64("DownlinkAck upto")?,
        },
        FrameType::Ping => Frame::Ping {
            nonce: r.u64("Ping nonce")?,
        },
        FrameType::Pong => Frame::Pong {
            nonce: r.u64("Pong nonce")?,
        },
        FrameType::GoAway => {
            let code = GoAwayCode::from_code(r.u16("GoAway code")?);
            let reason = r.str16("GoAway reason")?;
            // The optional trailer (module docs, "Evolution"): only sent to an agent that announced
            // `Capabilities::RETRY_AFTER`, so a build that predates it never sees these bytes.
            let retry_after_ms = if r.remaining() == 0 {
                None
            } else {
                Some(r.u32("GoAway retry_after_ms")?)
            };
            Frame::GoAway {
                code,
                reason,
                retry_after_ms,
            }
        }
        FrameType::Refused => Frame::Refused {
            seq: r.u64("Refused seq")?,
            reason_code: r.u8("Refused reason_code")?,
            detail: r.str16("Refused detail")?,
        },
    };
    r.finish(frame_type)?;
    Ok(frame)
}

fn parse_entries(r: &mut Reader) -> Result<Vec<Envelope>, DecodeError> {
    let count = usize::try_from(r.u32("entry count")?).unwrap_or(usize::MAX);
    // The count is untrusted: reserve only as many entries as the remaining bytes could hold if every one
    // were the smallest valid entry. An `Envelope` in memory is ~10x that smallest entry, so a lying count
    // costs no more than an honest frame of the same size (checked by `shared/tests/decode_alloc.rs`).
    let mut entries =
        Vec::with_capacity(count.min(r.remaining() / (ENTRY_HEADER + FIXED_BODY_LEN)));
    for _ in 0..count {
        let seq = r.u64("entry seq")?;
        let body = r.bytes32("entry body")?;
        entries.push(Envelope::decode_body(seq, body)?);
    }
    Ok(entries)
}

/// Splits the next whole frame off a read buffer and parses it; `Ok(None)` means "read more bytes".
///
/// # Errors
/// As [`check`] (except `Incomplete`) and [`parse`]. After an error the stream is unusable: close the
/// connection, with `GoAway { code: ProtocolError }` if possible.
pub fn decode(buf: &mut BytesMut, max_frame_size: usize) -> Result<Option<Frame>, DecodeError> {
    match check(buf, max_frame_size) {
        Ok(total) => {
            let mut frame = buf.split_to(total).freeze();
            frame.advance(LEN_PREFIX);
            parse(frame).map(Some)
        }
        Err(DecodeError::Incomplete) => Ok(None),
        Err(err) => Err(err),
    }
}

impl Frame {
    /// Appends the frame (length prefix included) to `buf`.
    ///
    /// This does not know the peer's maximum frame size; batchers that must respect it use
    /// [`BatchEncoder`].
    ///
    /// # Errors
    /// [`EncodeError::FieldTooLong`] or [`EncodeError::FrameTooLarge`] (over `u32::MAX`); `buf` is then left
    /// as it was.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let entries = match self {
            Self::Batch { entries } => Some((BatchKind::Uplink, entries)),
            Self::Downlink { entries } => Some((BatchKind::Downlink, entries)),
            _ => None,
        };
        if let Some((kind, entries)) = entries {
            let mut batch = BatchEncoder::new(buf, kind, u32::MAX as usize);
            for env in entries {
                batch.push_envelope(env)?;
            }
            batch.finish();
            return Ok(());
        }

        let start = buf.len();
        let result = self.write_fixed(buf, start);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }

    /// Writes every frame but the batches, then patches the length prefix.
    fn write_fixed(&self, buf: &mut BytesMut, start: usize) -> Result<(), EncodeError> {
        buf.put_u32(0);
        buf.put_u8(self.frame_type() as u8);
        match self {
            Self::Hello {
                versions,
                capabilities,
                agent_name,
                incarnation,
                last_acked,
                config_version,
                lane,
                agent_version,
                window,
            } => {
                buf.put_u16(versions.min);
                buf.put_u16(versions.max);
                buf.put_u64(capabilities.bits());
                buf.put_u64(*incarnation);
                buf.put_u64(*last_acked);
                buf.put_u64(*config_version);
                put_bytes16(buf, "Hello agent_name", agent_name.as_bytes())?;
                buf.put_u8(*lane);
                put_bytes16(buf, "Hello agent_version", agent_version.as_bytes())?;
                buf.put_u32(*window);
            }
            Self::Welcome {
                version,
                capabilities,
                max_frame_size,
                hub_high_water,
                config_version,
                max_message_size,
                max_topic_len,
                hub_version,
            } => {
                buf.put_u16(*version);
                buf.put_u64(capabilities.bits());
                buf.put_u32(*max_frame_size);
                buf.put_u64(*hub_high_water);
                buf.put_u64(*config_version);
                buf.put_u32(*max_message_size);
                buf.put_u16(*max_topic_len);
                // A version 2 Welcome ends here: the hub_version is not sent (and must be empty).
                if *version >= 3 {
                    put_bytes16(buf, "Welcome hub_version", hub_version.as_bytes())?;
                }
            }
            Self::Ack { upto: value }
            | Self::DownlinkAck { upto: value }
            | Self::Ping { nonce: value }
            | Self::Pong { nonce: value } => buf.put_u64(*value),
            Self::ConfigPush { version, body } => {
                buf.put_u64(*version);
                put_bytes32(buf, "ConfigPush body", body.as_bytes())?;
            }
            Self::ConfigAck { version, result } => {
                buf.put_u64(*version);
                match result {
                    Ok(()) => buf.put_u8(0),
                    Err(rejection) => {
                        buf.put_u8(1);
                        buf.put_u16(rejection.reason.code());
                        put_bytes32(buf, "ConfigAck detail", rejection.detail.as_bytes())?;
                    }
                }
            }
            Self::Refused {
                seq,
                reason_code,
                detail,
            } => {
                buf.put_u64(*seq);
                buf.put_u8(*reason_code);
                put_bytes16(buf, "Refused detail", detail.as_bytes())?;
            }
            Self::GoAway {
                code,
                reason,
                retry_after_ms,
            } => {
                buf.put_u16(code.code());
                put_bytes16(buf, "GoAway reason", reason.as_bytes())?;
                if let Some(ms) = retry_after_ms {
                    buf.put_u32(*ms);
                }
            }
            // Encoded by `BatchEncoder` in `encode`; nothing to write here.
            Self::Batch { .. } | Self::Downlink { .. } => {}
        }
        let len = buf.len() - start - LEN_PREFIX;
        let len = u32::try_from(len).map_err(|_| EncodeError::FrameTooLarge {
            len,
            max: u32::MAX as usize,
        })?;
        buf[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// Which entry-carrying frame a [`BatchEncoder`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchKind {
    /// Agent → hub: [`Frame::Batch`].
    Uplink,
    /// Hub → agent: [`Frame::Downlink`].
    Downlink,
}

impl BatchKind {
    /// The frame type written.
    pub const fn frame_type(self) -> FrameType {
        match self {
            Self::Uplink => FrameType::Batch,
            Self::Downlink => FrameType::Downlink,
        }
    }
}

/// Writes a `Batch` or `Downlink` frame entry by entry, straight from queue records, without decoding them.
///
/// It writes into the caller's buffer as it goes and keeps the frame within the peer's maximum frame size:
/// when [`try_push`](Self::try_push) answers [`EncodeError::FrameTooLarge`], [`finish`](Self::finish) this
/// frame and start another (if the batch is empty, the record can never be sent at this frame size).
/// Dropping the encoder without `finish` removes the partial frame from the buffer.
///
/// Raw bodies are copied as they are: a corrupt queue record reaches the peer, whose decoder rejects it.
#[derive(Debug)]
pub struct BatchEncoder<'a> {
    buf: &'a mut BytesMut,
    start: usize,
    max_frame_size: usize,
    count: u32,
    finished: bool,
}

impl<'a> BatchEncoder<'a> {
    /// Starts a frame at the end of `buf`. `max_frame_size` is the peer's limit on the length prefix (from
    /// `Welcome`); it is capped at `u32::MAX`, and should be at least 5, the size of an empty batch.
    pub fn new(buf: &'a mut BytesMut, kind: BatchKind, max_frame_size: usize) -> Self {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(kind.frame_type() as u8);
        buf.put_u32(0);
        debug_assert_eq!(buf.len() - start, LEN_PREFIX + BATCH_HEADER);
        Self {
            buf,
            start,
            max_frame_size: max_frame_size.min(u32::MAX as usize),
            count: 0,
            finished: false,
        }
    }

    /// Length the frame would have now (type byte plus body, as in the prefix).
    fn contents_len(&self) -> usize {
        self.buf.len() - self.start - LEN_PREFIX
    }

    /// Checks that an entry with a body of `body_len` bytes still fits.
    fn fits(&self, body_len: usize) -> Result<u32, EncodeError> {
        let len = self
            .contents_len()
            .saturating_add(ENTRY_HEADER)
            .saturating_add(body_len);
        if len > self.max_frame_size {
            return Err(EncodeError::FrameTooLarge {
                len,
                max: self.max_frame_size,
            });
        }
        u32_len(body_len, "entry body")
    }

    /// Appends one entry: the seq and a body as [`Envelope::encode_body`] wrote it (e.g. a queue record).
    ///
    /// # Errors
    /// [`EncodeError::FrameTooLarge`] if the entry does not fit in this frame; nothing is written then.
    pub fn try_push(&mut self, seq: u64, body: &[u8]) -> Result<(), EncodeError> {
        let body_len = self.fits(body.len())?;
        self.buf.reserve(ENTRY_HEADER + body.len());
        self.buf.put_u64(seq);
        self.buf.put_u32(body_len);
        self.buf.put_slice(body);
        self.count += 1;
        Ok(())
    }

    /// Appends one envelope, encoding its body in place.
    ///
    /// # Errors
    /// As [`try_push`](Self::try_push), plus the [`Envelope::encode_body`] errors; nothing is written then.
    pub fn push_envelope(&mut self, envelope: &Envelope) -> Result<(), EncodeError> {
        let body_len = self.fits(envelope.encoded_body_len())?;
        let at = self.buf.len();
        self.buf.put_u64(envelope.seq);
        self.buf.put_u32(body_len);
        if let Err(err) = envelope.encode_body(self.buf) {
            self.buf.truncate(at);
            return Err(err);
        }
        self.count += 1;
        Ok(())
    }

    /// Entries pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no entry has been pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the frame takes so far, length prefix included.
    pub fn encoded_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Completes the frame (patches its length and entry count) and returns its size in bytes, prefix
    /// included. An empty batch is a valid frame.
    pub fn finish(mut self) -> usize {
        let contents = self.contents_len();
        // Every push kept contents within max_frame_size <= u32::MAX, and an entry is at least 12 bytes, so
        // neither value can overflow; the fallbacks exist only to avoid a panic path.
        let len = u32::try_from(contents).unwrap_or(u32::MAX);
        let start = self.start;
        self.buf[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        let count_at = start + LEN_PREFIX + 1;
        self.buf[count_at..count_at + 4].copy_from_slice(&self.count.to_be_bytes());
        self.finished = true;
        LEN_PREFIX + contents
    }
}

impl Drop for BatchEncoder<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.buf.truncate(self.start);
        }
    }
}

/// Writes one whole `Batch`/`Downlink` frame from `(seq, body)` pairs (e.g. queue records), without decoding
/// them or checking a peer limit. Returns the frame's size, prefix included.
///
/// # Errors
/// [`EncodeError::FrameTooLarge`] if the frame would exceed `u32::MAX` bytes; `buf` is then left as it was.
pub fn encode_batch_raw<'b>(
    buf: &mut BytesMut,
    kind: BatchKind,
    entries: impl IntoIterator<Item = (u64, &'b [u8])>,
) -> Result<usize, EncodeError> {
    let mut batch = BatchEncoder::new(buf, kind, u32::MAX as usize);
    for (seq, body) in entries {
        batch.try_push(seq, body)?;
    }
    Ok(batch.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Properties, QoS};
    use crate::wire::arb::{arb_envelope, arb_frame};
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn encoded(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).expect("encodable");
        buf
    }

    fn envelope(seq: u64, payload: &'static [u8]) -> Envelope {
        Envelope {
            origin: "plant1".into(),
            seq,
            topic: "line1/temp".into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            trace: None,
            enqueued_at_ms: 5,
        }
    }

    #[test]
    fn golden_bytes_pin_the_layout() {
        let cases: Vec<(Frame, Vec<u8>)> = vec![
            (
                Frame::Ping { nonce: 0x0102 },
                vec![0, 0, 0, 9, 0x09, 0, 0, 0, 0, 0, 0, 1, 2],
            ),
            (
                Frame::Ack { upto: 7 },
                vec![0, 0, 0, 9, 0x04, 0, 0, 0, 0, 0, 0, 0, 7],
            ),
            (
                Frame::GoAway {
                    code: GoAwayCode::Replaced,
                    reason: "x".into(),
                    retry_after_ms: None,
                },
                vec![0, 0, 0, 6, 0x0B, 0, 3, 0, 1, b'x'],
            ),
            (
                Frame::GoAway {
                    code: GoAwayCode::Unavailable,
                    reason: "x".into(),
                    retry_after_ms: Some(0x0102),
                },
                vec![0, 0, 0, 10, 0x0B, 0, 7, 0, 1, b'x', 0, 0, 1, 2],
            ),
            (
                Frame::ConfigAck {
                    version: 1,
                    result: Ok(()),
                },
                vec![0, 0, 0, 10, 0x06, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            ),
            (
                Frame::Batch { entries: vec![] },
                vec![0, 0, 0, 5, 0x03, 0, 0, 0, 0],
            ),
            (
                Frame::Welcome {
                    version: 2,
                    capabilities: Capabilities::from_bits(3),
                    max_frame_size: 0x0100_0000,
                    hub_high_water: 9,
                    config_version: 1,
                    max_message_size: 0x0004_0000,
                    max_topic_len: 0xFFE4,
                    hub_version: String::new(),
                },
                // Version 2's layout, byte for byte as the release before version 3 sent and read it.
                vec![
                    0, 0, 0, 37, 0x02, // prefix, type
                    0, 2, // version
                    0, 0, 0, 0, 0, 0, 0, 3, // capabilities
                    1, 0, 0, 0, // max_frame_size
                    0, 0, 0, 0, 0, 0, 0, 9, // hub_high_water
                    0, 0, 0, 0, 0, 0, 0, 1, // config_version
                    0, 4, 0, 0, // max_message_size (256 KiB)
                    0xFF, 0xE4, // max_topic_len
                ],
            ),
            (
                Frame::Welcome {
                    version: 3,
                    capabilities: Capabilities::from_bits(3),
                    max_frame_size: 0x0100_0000,
                    hub_high_water: 9,
                    config_version: 1,
                    max_message_size: 0x0004_0000,
                    max_topic_len: 0xFFE4,
                    hub_version: "0.1.0".into(),
                },
                vec![
                    0, 0, 0, 44, 0x02, // prefix, type
                    0, 3, // version
                    0, 0, 0, 0, 0, 0, 0, 3, // capabilities
                    1, 0, 0, 0, // max_frame_size
                    0, 0, 0, 0, 0, 0, 0, 9, // hub_high_water
                    0, 0, 0, 0, 0, 0, 0, 1, // config_version
                    0, 4, 0, 0, // max_message_size (256 KiB)
                    0xFF, 0xE4, // max_topic_len
                    0, 5, b'0', b'.', b'1', b'.', b'0', // hub_version
                ],
            ),
        ];
        for (frame, bytes) in cases {
            assert_eq!(&encoded(&frame)[..], &bytes[..], "{frame:?}");
            let mut buf = BytesMut::from(&bytes[..]);
            assert_eq!(decode(&mut buf, 64), Ok(Some(frame)));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn parse_errors_table() {
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            (
                "empty frame",
                vec![],
                DecodeError::Truncated {
                    what: "frame type",
                    needed: 1,
                    available: 0,
                },
            ),
            (
                "unknown type",
                vec![0x42],
                DecodeError::UnknownFrameType(0x42),
            ),
            ("type zero", vec![0x00], DecodeError::UnknownFrameType(0)),
            (
                "ack with a trailing byte",
                vec![0x04, 0, 0, 0, 0, 0, 0, 0, 1, 0xAA],
                DecodeError::TrailingBytes {
                    frame: FrameType::Ack,
                    extra: 1,
                },
            ),
            (
                "goaway with a partial retry-after",
                vec![0x0B, 0, 7, 0, 0, 0, 1],
                DecodeError::Truncated {
                    what: "GoAway retry_after_ms",
                    needed: 4,
                    available: 2,
                },
            ),
            (
                "goaway with a byte after the retry-after",
                vec![0x0B, 0, 7, 0, 0, 0, 0, 0, 1, 0xAA],
                DecodeError::TrailingBytes {
                    frame: FrameType::GoAway,
                    extra: 1,
                },
            ),
            (
                "short ping",
                vec![0x09, 0, 0, 0],
                DecodeError::Truncated {
                    what: "Ping nonce",
                    needed: 8,
                    available: 3,
                },
            ),
            (
                "config ack status 2",
                vec![0x06, 0, 0, 0, 0, 0, 0, 0, 1, 2],
                DecodeError::InvalidTag {
                    what: "ConfigAck status",
                    value: 2,
                },
            ),
            (
                "goaway reason not utf-8",
                vec![0x0B, 0, 0, 0, 1, 0xC3],
                DecodeError::InvalidUtf8 {
                    field: "GoAway reason",
                },
            ),
            (
                "batch count beyond the bytes",
                vec![0x03, 0xFF, 0xFF, 0xFF, 0xFF],
                DecodeError::Truncated {
                    what: "entry seq",
                    needed: 8,
                    available: 0,
                },
            ),
            (
                "batch with one byte after its entries",
                vec![0x03, 0, 0, 0, 0, 0],
                DecodeError::TrailingBytes {
                    frame: FrameType::Batch,
                    extra: 1,
                },
            ),
            (
                "version 1 welcome (no limits)",
                // type, version 1, then capabilities, max_frame_size, hub_high_water, config_version.
                [&[0x02_u8, 0, 1][..], &[0; 8 + 4 + 8 + 8]].concat(),
                DecodeError::Truncated {
                    what: "Welcome max_message_size",
                    needed: 4,
                    available: 0,
                },
            ),
            (
                "entry body that is not an envelope",
                vec![0x07, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 9],
                DecodeError::UnsupportedBodyVersion(9),
            ),
        ];
        for (name, contents, want) in cases {
            assert_eq!(parse(Bytes::from(contents)), Err(want), "{name}");
        }
    }

    #[test]
    fn hello_ignores_bytes_a_later_version_appends() {
        let hello = Frame::Hello {
            versions: VersionRange { min: 1, max: 2 },
            capabilities: Capabilities::DOWNLINK | Capabilities::CONFIG_PUSH,
            agent_name: "plant1".into(),
            incarnation: 9,
            last_acked: 3,
            config_version: 4,
            lane: 7,
            agent_version: "0.9.0".into(),
            window: 8,
        };
        let mut buf = encoded(&hello);
        buf.extend_from_slice(b"future fields");
        let len = u32::try_from(buf.len() - LEN_PREFIX).expect("small");
        buf[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&mut buf, 1024), Ok(Some(hello)));
    }

    #[test]
    fn hello_of_an_agent_without_lanes_is_lane_zero() {
        let hello = Frame::Hello {
            versions: VersionRange { min: 1, max: 1 },
            capabilities: Capabilities::EMPTY,
            agent_name: "line1".into(),
            incarnation: 1,
            last_acked: 0,
            config_version: 0,
            lane: 0,
            agent_version: String::new(),
            window: 0,
        };
        let mut buf = encoded(&hello);
        // An older agent's Hello ends at the name: drop the lane byte, the (empty) version and the window.
        buf.truncate(buf.len() - 7);
        let len = u32::try_from(buf.len() - LEN_PREFIX).expect("small");
        buf[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&mut buf, 1024), Ok(Some(hello)));
    }

    #[test]
    fn decode_waits_for_whole_frames_and_keeps_the_rest() {
        let frames = [Frame::Ping { nonce: 1 }, Frame::Pong { nonce: 2 }];
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire).expect("encodable");
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(frame) = decode(&mut buf, 64).expect("valid stream") {
                got.push(frame);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_prefix_is_refused_from_four_bytes() {
        let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
        let want = DecodeError::FrameTooLarge {
            len: u32::MAX as usize,
            max: DEFAULT_MAX_FRAME_SIZE,
        };
        assert_eq!(check(&buf, DEFAULT_MAX_FRAME_SIZE), Err(want.clone()));
        assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME_SIZE), Err(want));
        assert_eq!(buf.len(), 4, "the buffer is left alone");
        // Exactly at the limit is fine (and merely incomplete here).
        assert_eq!(check(&[0, 0, 0, 64], 64), Err(DecodeError::Incomplete));
        assert_eq!(
            check(&[0, 0, 0, 65], 64),
            Err(DecodeError::FrameTooLarge { len: 65, max: 64 })
        );
        for short in [&[][..], &[0], &[0, 0, 0]] {
            assert_eq!(check(short, 64), Err(DecodeError::Incomplete));
        }
    }

    #[test]
    fn failed_encode_leaves_buffer_untouched() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let frame = Frame::GoAway {
            code: GoAwayCode::Normal,
            reason: "r".repeat(70_000),
            retry_after_ms: None,
        };
        assert_eq!(
            frame.encode(&mut buf),
            Err(EncodeError::FieldTooLong {
                field: "GoAway reason",
                len: 70_000,
                max: 65_535
            })
        );
        let mut bad = envelope(2, b"x");
        bad.topic = "t".repeat(70_000);
        let frame = Frame::Downlink {
            entries: vec![envelope(1, b"ok"), bad],
        };
        assert!(frame.encode(&mut buf).is_err());
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn dropped_batch_encoder_rolls_back() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        {
            let mut batch = BatchEncoder::new(&mut buf, BatchKind::Uplink, 1024);
            batch.try_push(1, b"body").expect("fits");
            assert_eq!(batch.len(), 1);
        }
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn batch_encoder_refuses_what_does_not_fit() {
        let mut buf = BytesMut::new();
        let mut batch =
            BatchEncoder::new(&mut buf, BatchKind::Uplink, BATCH_HEADER + ENTRY_HEADER + 3);
        assert_eq!(
            batch.try_push(1, b"four"),
            Err(EncodeError::FrameTooLarge {
                len: BATCH_HEADER + ENTRY_HEADER + 4,
                max: BATCH_HEADER + ENTRY_HEADER + 3
            })
        );
        assert!(batch.is_empty());
        batch.try_push(1, b"abc").expect("exactly at the limit");
        assert!(batch.try_push(2, b"").is_err());
        assert_eq!(
            batch.encoded_len(),
            LEN_PREFIX + BATCH_HEADER + ENTRY_HEADER + 3
        );
        assert_eq!(batch.finish(), LEN_PREFIX + BATCH_HEADER + ENTRY_HEADER + 3);
        // The bytes were copied blindly, so the peer sees them as a bad envelope body.
        assert_eq!(
            decode(&mut buf, 64),
            Err(DecodeError::UnsupportedBodyVersion(b'a'))
        );
    }

    #[test]
    fn goaway_and_reject_codes_round_trip() {
        for code in 0..=7u16 {
            assert_eq!(GoAwayCode::from_code(code).code(), code);
            assert_eq!(u16::from(GoAwayCode::from(code)), code);
            assert_eq!(ConfigRejectReason::from_code(code).code(), code);
        }
        assert_eq!(GoAwayCode::from_code(3), GoAwayCode::Replaced);
        assert_eq!(GoAwayCode::from_code(7), GoAwayCode::Unavailable);
        assert_eq!(GoAwayCode::from_code(8), GoAwayCode::Unknown(8));
        assert_eq!(
            ConfigRejectReason::from_code(0),
            ConfigRejectReason::Unknown(0)
        );
        for t in FrameType::ALL {
            assert_eq!(FrameType::try_from(t as u8), Ok(t));
        }
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in arb_frame()) {
            let mut buf = encoded(&frame);
            let total = buf.len();
            prop_assert_eq!(check(&buf, usize::MAX), Ok(total));
            prop_assert_eq!(decode(&mut buf, total - LEN_PREFIX), Ok(Some(frame)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn streams_decode_across_any_split(frames in vec(arb_frame(), 1..6), cut in vec(1usize..64, 1..32)) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire).expect("encodable");
            }
            let wire = wire.freeze();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let (mut at, mut i) = (0, 0);
            while at < wire.len() {
                let next = (at + cut[i % cut.len()]).min(wire.len());
                buf.extend_from_slice(&wire[at..next]);
                at = next;
                i += 1;
                while let Some(frame) = decode(&mut buf, usize::MAX).expect("valid stream") {
                    got.push(frame);
                }
            }
            prop_assert_eq!(got, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn strict_prefixes_never_yield_a_frame(frame in arb_frame()) {
            let full = encoded(&frame).freeze();
            for len in 0..full.len() {
                let prefix = full.slice(..len);
                prop_assert_eq!(check(&prefix, usize::MAX), Err(DecodeError::Incomplete));
                let mut buf = BytesMut::from(&prefix[..]);
                prop_assert_eq!(decode(&mut buf, usize::MAX), Ok(None));
                // Even without the length prefix to protect it, cut contents are an error, not a frame;
                // except a GoAway cut just before its optional retry-after, or a Hello cut just before its
                // lane or its agent version, which are the same frame without them (the length prefix
                // tells them apart).
                if len > LEN_PREFIX {
                    let cut = parse(full.slice(LEN_PREFIX..len));
                    if let Frame::Hello { agent_version, .. } = &frame {
                        // Cut before the window (4 bytes from the end), before the version (2 + its
                        // bytes before the window) too, or before the lane too.
                        let window_at = full.len() - 4;
                        let version_at = window_at - 2 - agent_version.len();
                        if [window_at, version_at, version_at - 1].contains(&len) {
                            let mut without = frame.clone();
                            if let Frame::Hello { lane, agent_version, window, .. } = &mut without {
                                *window = 0;
                                if len <= version_at {
                                    agent_version.clear();
                                }
                                if len == version_at - 1 {
                                    *lane = 0;
                                }
                            }
                            prop_assert_eq!(cut, Ok(without));
                            continue;
                        }
                    }
                    if let Frame::GoAway { code, reason, retry_after_ms: Some(_) } = &frame {
                        if len == full.len() - 4 {
                            let without = Frame::GoAway {
                                code: *code,
                                reason: reason.clone(),
                                retry_after_ms: None,
                            };
                            prop_assert_eq!(cut, Ok(without));
                            continue;
                        }
                    }
                    prop_assert!(cut.is_err(), "prefix of {} bytes parsed as {:?}", len, cut);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Whatever decodes must re-encode to a frame that decodes the same.
            while let Ok(Some(frame)) = decode(&mut buf, 256) {
                let mut again = encoded(&frame);
                prop_assert_eq!(decode(&mut again, usize::MAX), Ok(Some(frame)));
            }
            let _ = parse(Bytes::from(bytes));
        }

        #[test]
        fn mutated_frames_never_panic(
            frame in arb_frame(),
            flips in vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
            keep_prefix: bool,
        ) {
            let mut buf = encoded(&frame);
            for (at, byte) in flips {
                // Optionally keep the length prefix valid so the damage reaches the parser.
                let lo = if keep_prefix && buf.len() > LEN_PREFIX { LEN_PREFIX } else { 0 };
                let i = lo + at.index(buf.len() - lo);
                buf[i] ^= byte;
            }
            let limit = buf.len();
            while let Ok(Some(decoded)) = decode(&mut buf, limit) {
                let mut again = encoded(&decoded);
                prop_assert_eq!(decode(&mut again, usize::MAX), Ok(Some(decoded)));
            }
        }

        #[test]
        fn random_contents_behind_a_valid_type_never_panic(
            frame_type in proptest::sample::select(FrameType::ALL.to_vec()),
            body in vec(any::<u8>(), 0..256),
        ) {
            let mut contents = vec![frame_type as u8];
            contents.extend_from_slice(&body);
            if let Ok(frame) = parse(Bytes::from(contents)) {
                prop_assert_eq!(frame.frame_type(), frame_type);
            }
        }

        #[test]
        fn oversized_length_is_refused_before_buffering(
            max in 0usize..1 << 20,
            extra in 1u32..1 << 24,
            tail in vec(any::<u8>(), 0..16),
        ) {
            let len = u32::try_from(max).expect("small").saturating_add(extra);
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.extend_from_slice(&tail);
            let want = DecodeError::FrameTooLarge { len: len as usize, max };
            prop_assert_eq!(check(&buf, max), Err(want.clone()));
            prop_assert_eq!(decode(&mut buf, max), Err(want));
            prop_assert_eq!(buf.len(), 4 + tail.len());
        }

        #[test]
        fn raw_batches_match_envelope_batches(entries in vec(arb_envelope(), 0..8), downlink: bool) {
            let (kind, frame) = if downlink {
                (BatchKind::Downlink, Frame::Downlink { entries: entries.clone() })
            } else {
                (BatchKind::Uplink, Frame::Batch { entries: entries.clone() })
            };
            let records: Vec<(u64, Bytes)> = entries
                .iter()
                .map(|e| {
                    let mut body = BytesMut::new();
                    e.encode_body(&mut body).expect("encodable");
                    (e.seq, body.freeze())
                })
                .collect();
            let mut raw = BytesMut::new();
            let size = encode_batch_raw(&mut raw, kind, records.iter().map(|(s, b)| (*s, &b[..])))
                .expect("encodable");
            prop_assert_eq!(size, raw.len());
            let typed = encoded(&frame);
            prop_assert_eq!(&raw[..], &typed[..]);
            prop_assert_eq!(decode(&mut raw, usize::MAX), Ok(Some(frame)));
        }

        #[test]
        fn batch_encoder_splits_within_the_limit(
            entries in vec(arb_envelope(), 0..24),
            max in BATCH_HEADER..400,
        ) {
            let mut wire = BytesMut::new();
            let mut sendable = Vec::new();
            let mut pending = entries.iter().peekable();
            while pending.peek().is_some() {
                let mut batch = BatchEncoder::new(&mut wire, BatchKind::Uplink, max);
                while let Some(env) = pending.peek() {
                    match batch.push_envelope(env) {
                        Ok(()) => sendable.push((*env).clone()),
                        Err(EncodeError::FrameTooLarge { .. }) if !batch.is_empty() => break,
                        Err(EncodeError::FrameTooLarge { len, .. }) => {
                            // Alone in a frame and still too big: it can never be sent at this size.
                            prop_assert_eq!(len, BATCH_HEADER + ENTRY_HEADER + env.encoded_body_len());
                        }
                        Err(other) => prop_assert!(false, "unexpected {:?}", other),
                    }
                    pending.next();
                }
                if batch.is_empty() {
                    drop(batch);
                } else {
                    batch.finish();
                }
            }
            let mut got = Vec::new();
            while let Some(frame) = decode(&mut wire, max).expect("every frame within max") {
                match frame {
                    Frame::Batch { entries } => got.extend(entries),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert!(wire.is_empty());
            prop_assert_eq!(got, sendable);
        }
    }
}
