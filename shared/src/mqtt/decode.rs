//! Splitting a byte stream into MQTT packets and decoding the packets the front needs.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::{
    Ack, AckKind, Connect, DecodeError, Filters, PacketType, ProtocolVersion, Publish,
    PublishProperties, QoS, Will,
};

/// The fixed header of an MQTT packet: first byte plus remaining-length varint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// Packet type from the 4 high bits.
    pub packet_type: PacketType,
    /// The 4 low bits of the first byte (PUBLISH: DUP, QoS, RETAIN).
    pub flags: u8,
    /// Bytes taken by the fixed header itself (2 to 5).
    pub header_len: usize,
    /// Bytes that follow the fixed header.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// Decodes the fixed header at the start of `buf`, without needing the body.
    ///
    /// `max_packet_size` bounds the whole packet (header included), so a peer cannot make the caller
    /// buffer more than that before the check fails: the size is known once the varint is read.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `buf` ends inside the fixed header; [`DecodeError::PacketTooLarge`],
    /// [`DecodeError::RemainingLengthTooLong`], [`DecodeError::ReservedPacketType`],
    /// [`DecodeError::InvalidFlags`] or [`DecodeError::InvalidQoS`] for malformed headers.
    pub fn parse(buf: &[u8], max_packet_size: usize) -> Result<Self, DecodeError> {
        let &byte = buf.first().ok_or(DecodeError::Incomplete)?;
        let packet_type =
            PacketType::from_code(byte >> 4).ok_or(DecodeError::ReservedPacketType { byte })?;
        let flags = byte & 0x0f;
        check_flags(packet_type, flags)?;

        let mut remaining_len = 0usize;
        let mut shift = 0u32;
        let mut pos = 1;
        loop {
            if pos > 4 {
                return Err(DecodeError::RemainingLengthTooLong);
            }
            let &b = buf.get(pos).ok_or(DecodeError::Incomplete)?;
            remaining_len |= usize::from(b & 0x7f) << shift;
            pos += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let size = pos + remaining_len;
        if size > max_packet_size {
            return Err(DecodeError::PacketTooLarge {
                size,
                max: max_packet_size,
            });
        }
        Ok(Self {
            packet_type,
            flags,
            header_len: pos,
            remaining_len,
        })
    }

    /// Total packet length: fixed header plus remaining length.
    #[must_use]
    pub const fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

fn check_flags(packet_type: PacketType, flags: u8) -> Result<(), DecodeError> {
    let ok = match packet_type {
        PacketType::Publish => {
            if (flags >> 1) & 0b11 == 0b11 {
                return Err(DecodeError::InvalidQoS);
            }
            true
        }
        PacketType::Pubrel | PacketType::Subscribe | PacketType::Unsubscribe => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

/// Length of the complete packet at the start of `buf`.
///
/// # Errors
/// [`DecodeError::Incomplete`] unless the whole packet is in `buf`; otherwise as [`FixedHeader::parse`].
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<usize, DecodeError> {
    let header = FixedHeader::parse(buf, max_packet_size)?;
    if buf.len() < header.frame_len() {
        return Err(DecodeError::Incomplete);
    }
    Ok(header.frame_len())
}

/// Removes the complete packet at the start of `buf` and returns it with its header. Zero-copy: the
/// returned bytes share `buf`'s allocation. `buf` is untouched on error.
///
/// # Errors
/// As [`frame_len`].
pub fn split_frame(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<(FixedHeader, Bytes), DecodeError> {
    let header = FixedHeader::parse(buf, max_packet_size)?;
    if buf.len() < header.frame_len() {
        return Err(DecodeError::Incomplete);
    }
    Ok((header, buf.split_to(header.frame_len()).freeze()))
}

/// Checks that `frame` starts with a complete packet of type `expected`; returns its header.
fn expect_frame(frame: &[u8], expected: PacketType) -> Result<FixedHeader, DecodeError> {
    let header = FixedHeader::parse(frame, usize::MAX)?;
    if frame.len() < header.frame_len() {
        return Err(DecodeError::Incomplete);
    }
    if header.packet_type != expected {
        return Err(DecodeError::UnexpectedPacket {
            expected,
            found: header.packet_type,
        });
    }
    Ok(header)
}

/// A bounds-checked cursor over a packet body. Every read names its field for errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    const fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<Range<usize>, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { field });
        }
        let range = self.pos..self.pos + n;
        self.pos += n;
        Ok(range)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let r = self.take(1, field)?;
        Ok(self.buf[r.start])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let r = self.take(2, field)?;
        Ok(u16::from_be_bytes([
            self.buf[r.start],
            self.buf[r.start + 1],
        ]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let r = self.take(4, field)?;
        let b = &self.buf[r];
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Length-prefixed binary data; returns its range in the body.
    fn binary(&mut self, field: &'static str) -> Result<Range<usize>, DecodeError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    /// Length-prefixed UTF-8 string without U+0000.
    fn string(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let r = self.binary(field)?;
        let s =
            std::str::from_utf8(&self.buf[r]).map_err(|_| DecodeError::InvalidUtf8 { field })?;
        if s.contains('\0') {
            return Err(DecodeError::ForbiddenCharacter { field });
        }
        Ok(s)
    }

    /// Variable-byte integer (at most 4 bytes).
    fn varint(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8(field)?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarIntTooLong { field })
    }

    /// Skips a v5 property block (length varint + properties) without decoding it.
    fn skip_properties(&mut self) -> Result<(), DecodeError> {
        let len = self.varint("property length")?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
            field: "properties",
        })?;
        self.take(len, "properties").map(drop)
    }
}

impl Connect {
    /// Decodes the CONNECT at the start of `frame` (fixed header included). Reads the fields up to the
    /// client id and the will; username and password are left for the broker.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `frame` holds less than the whole packet,
    /// [`DecodeError::UnexpectedPacket`] for another packet type, or a malformed-field variant.
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let header = expect_frame(frame, PacketType::Connect)?;
        let mut r = Reader::new(&frame[header.header_len..header.frame_len()]);
        let protocol_name = r.string("protocol name")?;
        if protocol_name != "MQTT" && protocol_name != "MQIsdp" {
            return Err(DecodeError::UnknownProtocolName {
                name: protocol_name.to_owned(),
            });
        }
        let protocol_level = r.u8("protocol level")?;
        let flags = r.u8("connect flags")?;
        let keep_alive = r.u16("keep alive")?;
        let mut session_expiry = 0;
        if protocol_level == ProtocolVersion::V5.level() {
            let len = r.varint("properties length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
                field: "properties",
            })?;
            let range = r.take(len, "properties")?;
            let body = &frame[header.header_len..header.frame_len()];
            session_expiry = connect_session_expiry(&body[range])?;
        }
        let client_id = r.string("client id")?.to_owned();
        let will = if flags & WILL_FLAG == 0 {
            None
        } else {
            let (properties, delay_secs) = if protocol_level == ProtocolVersion::V5.level() {
                let len = r.varint("will properties length")?;
                let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
                    field: "will properties",
                })?;
                let range = r.take(len, "will properties")?;
                let body = &frame[header.header_len..header.frame_len()];
                let block = Bytes::copy_from_slice(&body[range]);
                decode_properties(&block, true)?
            } else {
                (PublishProperties::default(), 0)
            };
            let topic = r.string("will topic")?;
            if topic.is_empty() || topic.contains(['+', '#']) {
                return Err(DecodeError::ForbiddenCharacter {
                    field: "will topic",
                });
            }
            let topic = topic.to_owned();
            let range = r.binary("will payload")?;
            let body = &frame[header.header_len..header.frame_len()];
            let payload = Bytes::copy_from_slice(&body[range]);
            let qos = QoS::from_code((flags >> 3) & 0b11).ok_or(DecodeError::InvalidQoS)?;
            Some(Will {
                publish: Publish {
                    dup: false,
                    qos,
                    retain: flags & WILL_RETAIN != 0,
                    topic,
                    packet_id: None,
                    properties,
                    payload,
                },
                delay_secs,
            })
        };
        Ok(Self {
            protocol_name: protocol_name.to_owned(),
            protocol_level,
            client_id,
            keep_alive,
            clean_start: flags & 0b10 != 0,
            will,
            session_expiry,
        })
    }
}

/// The Session Expiry Interval (0x11) of a v5 CONNECT property block, 0 when absent (MQTT 5.0
/// §3.1.2.11.2). The other properties are stepped over by their types (§2.2.2.2).
fn connect_session_expiry(block: &[u8]) -> Result<u32, DecodeError> {
    let mut r = Reader::new(block);
    let mut expiry = None;
    while r.remaining() > 0 {
        let id = r.u8("property identifier")?;
        match id {
            0x11 => {
                let v = r.u32("session expiry interval")?;
                set_once(&mut expiry, id, v)?;
            }
            // Byte properties.
            0x17 | 0x19 => {
                r.u8("property")?;
            }
            // Two-byte integers: receive maximum, topic alias maximum.
            0x21 | 0x22 => {
                r.u16("property")?;
            }
            // Four-byte integer: maximum packet size.
            0x27 => {
                r.u32("property")?;
            }
            // Strings and binary data: authentication method and data.
            0x15 | 0x16 => {
                r.binary("property")?;
            }
            0x26 => {
                r.string("user property name")?;
                r.string("user property value")?;
            }
            _ => return Err(DecodeError::InvalidProperty { id }),
        }
    }
    Ok(expiry.unwrap_or(0))
}

impl Publish {
    /// Decodes the PUBLISH at the start of `frame` (fixed header included) as sent with protocol
    /// `version`. The payload and correlation data are slices of `frame` (zero-copy). The topic is not
    /// alias-resolved: see [`super::TopicAliases`].
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `frame` holds less than the whole packet,
    /// [`DecodeError::UnexpectedPacket`] for another packet type, or a malformed-field variant.
    pub fn decode(frame: &Bytes, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let header = expect_frame(frame, PacketType::Publish)?;
        let body = frame.slice(header.header_len..header.frame_len());
        let mut r = Reader::new(&body);
        let qos = QoS::from_code((header.flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
        let topic = r.string("topic name")?;
        if topic.contains(['+', '#']) {
            return Err(DecodeError::ForbiddenCharacter {
                field: "topic name",
            });
        }
        if topic.is_empty() && version != ProtocolVersion::V5 {
            return Err(DecodeError::EmptyTopicName);
        }
        let topic = topic.to_owned();
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            match r.u16("packet identifier")? {
                0 => return Err(DecodeError::ZeroPacketId),
                id => Some(id),
            }
        };
        let properties = if version.has_properties() {
            let len = r.varint("property length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError::Truncated {
                field: "properties",
            })?;
            let range = r.take(len, "properties")?;
            decode_publish_properties(&body.slice(range))?
        } else {
            PublishProperties::default()
        };
        Ok(Self {
            dup: header.flags & 0b1000 != 0,
            qos,
            retain: header.flags & 0b0001 != 0,
            topic,
            packet_id,
            properties,
            payload: body.slice(r.pos..),
        })
    }
}

fn set_once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty { id });
    }
    *slot = Some(value);
    Ok(())
}

/// CONNECT flag bits for the will (MQTT 3.1.1 §3.1.2.3).
const WILL_FLAG: u8 = 0b0000_0100;
const WILL_RETAIN: u8 = 0b0010_0000;

fn decode_publish_properties(block: &Bytes) -> Result<PublishProperties, DecodeError> {
    decode_properties(block, false).map(|(props, _)| props)
}

/// PUBLISH properties, or (with `will`) CONNECT will properties: the same set plus the Will Delay
/// Interval (0x18), returned beside them (0 when absent).
fn decode_properties(block: &Bytes, will: bool) -> Result<(PublishProperties, u32), DecodeError> {
    let mut props = PublishProperties::default();
    let mut will_delay = None;
    let mut r = Reader::new(block);
    while r.remaining() > 0 {
        let id = r.u8("property identifier")?;
        match id {
            0x18 if will => {
                let v = r.u32("will delay interval")?;
                set_once(&mut will_delay, id, v)?;
            }
            // A topic alias or subscription identifier belongs to a PUBLISH on the wire, not to a will.
            0x0B | 0x23 if will => return Err(DecodeError::InvalidProperty { id }),
            0x01 => {
                let v = r.u8("payload format indicator")?;
                if v > 1 {
                    return Err(DecodeError::InvalidPropertyValue { id });
                }
                set_once(&mut props.payload_format_indicator, id, v)?;
            }
            0x02 => {
                let v = r.u32("message expiry interval")?;
                set_once(&mut props.message_expiry_interval, id, v)?;
            }
            0x03 => {
                let v = r.string("content type")?.to_owned();
                set_once(&mut props.content_type, id, v)?;
            }
            0x08 => {
                let v = r.string("response topic")?;
                if v.contains(['+', '#']) {
                    return Err(DecodeError::ForbiddenCharacter {
                        field: "response topic",
                    });
                }
                set_once(&mut props.response_topic, id, v.to_owned())?;
            }
            0x09 => {
                let range = r.binary("correlation data")?;
                set_once(&mut props.correlation_data, id, block.slice(range))?;
            }
            0x0B => {
                let v = r.varint("subscription identifier")?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id });
                }
                props.subscription_identifiers.push(v);
            }
            0x23 => {
                let v = r.u16("topic alias")?;
                if v == 0 {
                    return Err(DecodeError::InvalidPropertyValue { id });
                }
                set_once(&mut props.topic_alias, id, v)?;
            }
            0x26 => {
                let name = r.string("user property name")?.to_owned();
                let value = r.string("user property value")?.to_owned();
                props.user_properties.push((name, value));
            }
            _ => return Err(DecodeError::InvalidProperty { id }),
        }
    }
    Ok((props, will_delay.unwrap_or(0)))
}

impl Ack {
    /// Decodes the PUBACK or PUBREC at the start of `frame` (fixed header included). v5 reason
    /// strings and user properties are skipped: the front only matches packet ids.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `frame` holds less than the whole packet,
    /// [`DecodeError::UnexpectedPacket`] if it is neither PUBACK nor PUBREC, or a malformed-field variant.
    pub fn decode(frame: &[u8], version: ProtocolVersion) -> Result<Self, DecodeError> {
        let header = FixedHeader::parse(frame, usize::MAX)?;
        let kind = match header.packet_type {
            PacketType::Puback => AckKind::Puback,
            PacketType::Pubrec => AckKind::Pubrec,
            found => {
                return Err(DecodeError::UnexpectedPacket {
                    expected: PacketType::Puback,
                    found,
                })
            }
        };
        if frame.len() < header.frame_len() {
            return Err(DecodeError::Incomplete);
        }
        let mut r = Reader::new(&frame[header.header_len..header.frame_len()]);
        let packet_id = r.u16("packet identifier")?;
        if packet_id == 0 {
            return Err(DecodeError::ZeroPacketId);
        }
        let mut reason = 0;
        if version.has_properties() {
            if r.remaining() > 0 {
                reason = r.u8("reason code")?;
            }
            if r.remaining() > 0 {
                r.skip_properties()?;
            }
        }
        if r.remaining() > 0 {
            return Err(DecodeError::TrailingBytes {
                extra: r.remaining(),
            });
        }
        Ok(Self {
            kind,
            packet_id,
            reason,
        })
    }
}

impl Filters {
    /// Decodes the filters of the SUBSCRIBE or UNSUBSCRIBE at the start of `frame` (fixed header
    /// included), sent with protocol `version`.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `frame` holds less than the whole packet,
    /// [`DecodeError::UnexpectedPacket`] for another packet type, [`DecodeError::Truncated`] for a
    /// packet without any filter, or a malformed-field variant.
    pub fn decode(frame: &[u8], version: ProtocolVersion) -> Result<Self, DecodeError> {
        let header = FixedHeader::parse(frame, usize::MAX)?;
        if frame.len() < header.frame_len() {
            return Err(DecodeError::Incomplete);
        }
        let subscribe = match header.packet_type {
            PacketType::Subscribe => true,
            PacketType::Unsubscribe => false,
            found => {
                return Err(DecodeError::UnexpectedPacket {
                    expected: PacketType::Subscribe,
                    found,
                })
            }
        };
        let mut r = Reader::new(&frame[header.header_len..header.frame_len()]);
        let packet_id = match r.u16("packet identifier")? {
            0 => return Err(DecodeError::ZeroPacketId),
            id => id,
        };
        if version.has_properties() {
            r.skip_properties()?;
        }
        let mut filters = Vec::new();
        let mut options = Vec::new();
        loop {
            filters.push(r.string("topic filter")?.to_owned());
            if subscribe {
                options.push(r.u8("subscription options")?);
            }
            if r.remaining() == 0 {
                break;
            }
        }
        Ok(Self {
            packet_id,
            filters,
            options,
        })
    }
}

/// The SUBSCRIBE at the start of `frame` with only the filters `keep` marks (in packet order), packet
/// identifier and properties unchanged: what the front forwards when an ACL denies some of a
/// subscription's filters. `None` if nothing is kept or `keep` does not fit the packet.
///
/// # Errors
/// As [`Filters::decode`].
pub fn subscribe_keeping(
    frame: &[u8],
    version: ProtocolVersion,
    keep: &[bool],
) -> Result<Option<Bytes>, DecodeError> {
    let header = FixedHeader::parse(frame, usize::MAX)?;
    if frame.len() < header.frame_len() {
        return Err(DecodeError::Incomplete);
    }
    let body = &frame[header.header_len..header.frame_len()];
    let mut r = Reader::new(body);
    r.u16("packet identifier")?;
    if version.has_properties() {
        r.skip_properties()?;
    }
    let prefix = body.len() - r.remaining();
    let mut kept = Vec::with_capacity(body.len());
    kept.extend_from_slice(&body[..prefix]);
    let mut index = 0;
    let mut any = false;
    while r.remaining() > 0 {
        let start = body.len() - r.remaining();
        r.string("topic filter")?;
        r.u8("subscription options")?;
        let end = body.len() - r.remaining();
        match keep.get(index) {
            Some(true) => {
                kept.extend_from_slice(&body[start..end]);
                any = true;
            }
            Some(false) => {}
            None => return Ok(None),
        }
        index += 1;
    }
    if !any || index != keep.len() {
        return Ok(None);
    }
    let mut out = bytes::BytesMut::with_capacity(kept.len() + 5);
    out.extend_from_slice(&[0x82]);
    crate::mqtt::encode::put_remaining_length(&mut out, kept.len());
    out.extend_from_slice(&kept);
    Ok(Some(out.freeze()))
}

/// The packet identifier and reason codes of the SUBACK at the start of `frame`.
///
/// # Errors
/// [`DecodeError::UnexpectedPacket`] for another packet, or a malformed-field variant.
pub fn suback_codes(frame: &[u8], version: ProtocolVersion) -> Result<(u16, Vec<u8>), DecodeError> {
    let header = FixedHeader::parse(frame, usize::MAX)?;
    if frame.len() < header.frame_len() {
        return Err(DecodeError::Incomplete);
    }
    if header.packet_type != PacketType::Suback {
        return Err(DecodeError::UnexpectedPacket {
            expected: PacketType::Suback,
            found: header.packet_type,
        });
    }
    let mut r = Reader::new(&frame[header.header_len..header.frame_len()]);
    let packet_id = r.u16("packet identifier")?;
    if version.has_properties() {
        r.skip_properties()?;
    }
    let mut codes = Vec::with_capacity(r.remaining());
    while r.remaining() > 0 {
        codes.push(r.u8("reason code")?);
    }
    Ok((packet_id, codes))
}

/// Where a CONNECT's login sits: the byte offsets the front needs to read the username and password
/// and to replace them (see [`super::encode::replace_connect_login`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectLogin {
    /// Offset of the connect-flags byte in the frame.
    pub flags_at: usize,
    /// Offset where the username (or, without one, the password) starts: everything before it is kept
    /// as it is when the login is replaced.
    pub login_at: usize,
    /// The username's bytes in the frame, when the username flag is set.
    pub username: Option<Range<usize>>,
    /// The password's bytes in the frame, when the password flag is set.
    pub password: Option<Range<usize>>,
}

impl ConnectLogin {
    /// Finds the login fields of the CONNECT at the start of `frame` (fixed header included), for
    /// any protocol level: v5 property blocks are skipped, not decoded.
    ///
    /// # Errors
    /// [`DecodeError::Incomplete`] if `frame` holds less than the whole packet,
    /// [`DecodeError::UnexpectedPacket`] for another packet type, [`DecodeError::Truncated`] when a
    /// field runs past the packet.
    pub fn locate(frame: &[u8]) -> Result<Self, DecodeError> {
        let header = expect_frame(frame, PacketType::Connect)?;
        let base = header.header_len;
        let mut r = Reader::new(&frame[base..header.frame_len()]);
        r.binary("protocol name")?;
        let level = r.u8("protocol level")?;
        let flags_at = base + r.pos;
        let flags = r.u8("connect flags")?;
        r.u16("keep alive")?;
        let v5 = level == ProtocolVersion::V5.level();
        if v5 {
            r.skip_properties()?;
        }
        r.binary("client id")?;
        if flags & WILL_FLAG != 0 {
            if v5 {
                r.skip_properties()?;
            }
            r.binary("will topic")?;
            r.binary("will payload")?;
        }
        let login_at = base + r.pos;
        let shift = |range: Range<usize>| base + range.start..base + range.end;
        let username = if flags & USERNAME_FLAG == 0 {
            None
        } else {
            Some(shift(r.binary("username")?))
        };
        let password = if flags & PASSWORD_FLAG == 0 {
            None
        } else {
            Some(shift(r.binary("password")?))
        };
        Ok(Self {
            flags_at,
            login_at,
            username,
            password,
        })
    }
}

/// CONNECT flag: a username follows.
pub(crate) const USERNAME_FLAG: u8 = 0b1000_0000;
/// CONNECT flag: a password follows.
pub(crate) const PASSWORD_FLAG: u8 = 0b0100_0000;
