//! Encoders for the packets the front writes itself (acks, CONNACK refusals) and for PUBLISH, which
//! the cloud side and the round-trip property tests need.

use bytes::{BufMut, BytesMut};

use super::{
    AckKind, EncodeError, ProtocolVersion, Publish, PublishProperties, QoS, MAX_REMAINING_LENGTH,
};

/// Bytes a variable-byte integer of `value` takes.
const fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `value` (at most [`MAX_REMAINING_LENGTH`]) as a variable-byte integer.
/// Appends a fixed header's remaining length.
pub(crate) fn put_remaining_length(out: &mut BytesMut, value: usize) {
    put_varint(out, value);
}

fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        // Truncation intended: the low 7 bits.
        #[allow(clippy::cast_possible_truncation)]
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

fn check_len(field: &'static str, len: usize) -> Result<u16, EncodeError> {
    u16::try_from(len).map_err(|_| EncodeError::FieldTooLong { field, len })
}

fn put_binary(out: &mut BytesMut, field: &'static str, bytes: &[u8]) -> Result<(), EncodeError> {
    out.put_u16(check_len(field, bytes.len())?);
    out.put_slice(bytes);
    Ok(())
}

fn encode_publish_properties(
    props: &PublishProperties,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if let Some(v) = props.payload_format_indicator {
        out.put_u8(0x01);
        out.put_u8(v);
    }
    if let Some(v) = props.message_expiry_interval {
        out.put_u8(0x02);
        out.put_u32(v);
    }
    if let Some(v) = &props.content_type {
        out.put_u8(0x03);
        put_binary(out, "content type", v.as_bytes())?;
    }
    if let Some(v) = &props.response_topic {
        out.put_u8(0x08);
        put_binary(out, "response topic", v.as_bytes())?;
    }
    if let Some(v) = &props.correlation_data {
        out.put_u8(0x09);
        put_binary(out, "correlation data", v)?;
    }
    for &id in &props.subscription_identifiers {
        if id == 0 || id as usize > MAX_REMAINING_LENGTH {
            return Err(EncodeError::SubscriptionIdentifierOutOfRange { value: id });
        }
        out.put_u8(0x0B);
        put_varint(out, id as usize);
    }
    if let Some(v) = props.topic_alias {
        out.put_u8(0x23);
        out.put_u16(v);
    }
    for (name, value) in &props.user_properties {
        out.put_u8(0x26);
        put_binary(out, "user property name", name.as_bytes())?;
        put_binary(out, "user property value", value.as_bytes())?;
    }
    Ok(())
}

/// Appends `publish` encoded for protocol `version` to `out`. Properties are written only for v5.
///
/// # Errors
/// [`EncodeError`] when a field does not fit MQTT's limits or the packet id does not match the QoS.
/// `out` may then hold a partial packet: truncate it back if it is reused.
pub fn encode_publish(
    publish: &Publish,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    match (publish.qos, publish.packet_id) {
        (QoS::AtMostOnce, None) => {}
        (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) if id != 0 => {}
        (qos, packet_id) => return Err(EncodeError::PacketIdMismatch { qos, packet_id }),
    }
    let topic_len = check_len("topic name", publish.topic.len())?;
    let mut props = BytesMut::new();
    if version.has_properties() {
        encode_publish_properties(&publish.properties, &mut props)?;
    }
    let props_len = if version.has_properties() {
        varint_len(props.len()) + props.len()
    } else {
        0
    };
    let id_len = if publish.packet_id.is_some() { 2 } else { 0 };
    let remaining = 2 + publish.topic.len() + id_len + props_len + publish.payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { len: remaining });
    }
    let flags =
        (u8::from(publish.dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain);
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(0x30 | flags);
    put_varint(out, remaining);
    out.put_u16(topic_len);
    out.put_slice(publish.topic.as_bytes());
    if let Some(id) = publish.packet_id {
        out.put_u16(id);
    }
    if version.has_properties() {
        put_varint(out, props.len());
        out.put_slice(&props);
    }
    out.put_slice(&publish.payload);
    Ok(())
}

/// Appends a PUBACK or PUBREC for `packet_id` to `out`.
///
/// For v5 a non-zero `reason` is written (e.g. [`super::REASON_QUOTA_EXCEEDED`]); success is written in
/// the short 2-byte form. Before v5 there is no reason code on the wire and `reason` is ignored, which
/// is why the front closes a 3.1.1 connection instead of reporting a failed commit.
pub fn encode_ack(
    kind: AckKind,
    packet_id: u16,
    reason: u8,
    version: ProtocolVersion,
    out: &mut BytesMut,
) {
    let first = (kind.packet_type() as u8) << 4;
    if version.has_properties() && reason != 0 {
        out.put_slice(&[first, 3]);
        out.put_u16(packet_id);
        out.put_u8(reason);
    } else {
        out.put_slice(&[first, 2]);
        out.put_u16(packet_id);
    }
}

/// Appends a CONNACK refusing the connection with return/reason `code` to `out`, in the format a client
/// of `version` expects (3.1 and 3.1.1: 2-byte body; 5.0: with an empty property block).
pub fn encode_connack_refusal(version: ProtocolVersion, code: u8, out: &mut BytesMut) {
    if version.has_properties() {
        out.put_slice(&[0x20, 3, 0, code, 0]);
    } else {
        out.put_slice(&[0x20, 2, 0, code]);
    }
}

/// Appends a SUBACK for `packet_id` with one return/reason code per filter (3.1.1 §3.9, 5.0 §3.9; v5
/// with an empty property block).
///
/// # Errors
/// [`EncodeError::PacketTooLarge`] for more codes than a packet holds.
pub fn encode_suback(
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_sub_ack(0x90, version, packet_id, codes, out)
}

/// Appends an UNSUBACK for `packet_id`: 3.1.1 has no codes (they are ignored); v5 has one reason code
/// per filter (§3.11) and an empty property block.
///
/// # Errors
/// [`EncodeError::PacketTooLarge`] for more codes than a packet holds.
pub fn encode_unsuback(
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let codes = if version.has_properties() { codes } else { &[] };
    encode_sub_ack(0xB0, version, packet_id, codes, out)
}

fn encode_sub_ack(
    first: u8,
    version: ProtocolVersion,
    packet_id: u16,
    codes: &[u8],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let props = usize::from(version.has_properties());
    let remaining = 2 + props + codes.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { len: remaining });
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(first);
    put_varint(out, remaining);
    out.put_u16(packet_id);
    if props == 1 {
        out.put_u8(0);
    }
    out.put_slice(codes);
    Ok(())
}

/// Appends a PUBREL for `packet_id` (success, short form in both versions).
pub fn encode_pubrel(packet_id: u16, out: &mut BytesMut) {
    out.put_slice(&[0x62, 2]);
    out.put_u16(packet_id);
}

/// Sets the packet id and DUP flag of an encoded QoS 1/2 PUBLISH `frame` in place (the packet id sits
/// right after the topic name, MQTT 3.1.1 §3.3.2, 5.0 §3.3.2). Returns `false`, changing nothing, if
/// `frame` is not a whole QoS 1/2 PUBLISH.
pub fn set_publish_packet_id(frame: &mut [u8], packet_id: u16, dup: bool) -> bool {
    let Ok(header) = super::FixedHeader::parse(frame, usize::MAX) else {
        return false;
    };
    if header.packet_type != super::PacketType::Publish
        || frame.len() < header.frame_len()
        || (frame[0] >> 1) & 0b11 == 0
    {
        return false;
    }
    let at = header.header_len;
    let Some(&[hi, lo]) = frame.get(at..at + 2) else {
        return false;
    };
    let id_at = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
    let Some(slot) = frame.get_mut(id_at..id_at + 2) else {
        return false;
    };
    slot.copy_from_slice(&packet_id.to_be_bytes());
    if dup {
        frame[0] |= 0b1000;
    } else {
        frame[0] &= !0b1000;
    }
    true
}

/// Re-encodes the CONNECT at the start of `frame` with `username` and `password` as its login, keeping
/// every other field byte for byte. The front uses it to present the per-start internal login to the
/// embedded broker's listeners (`broker/src/embedded.rs`) in place of whatever the client sent, which
/// the front has already checked.
///
/// # Errors
/// [`EncodeError::Malformed`] when `frame` is not a whole, well-formed CONNECT;
/// [`EncodeError::FieldTooLong`] or [`EncodeError::PacketTooLarge`] when the new login does not fit.
pub fn replace_connect_login(
    frame: &[u8],
    username: &[u8],
    password: &[u8],
) -> Result<BytesMut, EncodeError> {
    let at = super::decode::ConnectLogin::locate(frame).map_err(EncodeError::Malformed)?;
    let header = super::FixedHeader::parse(frame, usize::MAX).map_err(EncodeError::Malformed)?;
    let kept = &frame[header.header_len..at.login_at];
    let remaining = kept.len() + 2 + username.len() + 2 + password.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { len: remaining });
    }
    let mut out = BytesMut::with_capacity(1 + varint_len(remaining) + remaining);
    out.put_u8(frame[0]);
    put_remaining_length(&mut out, remaining);
    let flags_at = out.len() + at.flags_at - header.header_len;
    out.put_slice(kept);
    out[flags_at] |= super::decode::USERNAME_FLAG | super::decode::PASSWORD_FLAG;
    put_binary(&mut out, "username", username)?;
    put_binary(&mut out, "password", password)?;
    Ok(out)
}
