// Table rows are plain tuples on purpose: one line per case reads better than a struct per table.
#![allow(clippy::type_complexity)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const MAX: usize = MAX_REMAINING_LENGTH + 5;

#[test]
fn remaining_length_edges() {
    // (bytes after the first byte, expected result: header_len and remaining_len, or error)
    let cases: &[(&[u8], Result<(usize, usize), DecodeError>)] = &[
        (&[], Err(DecodeError::Incomplete)),
        (&[0x00], Ok((2, 0))),
        (&[0x7f], Ok((2, 127))),
        (&[0x80], Err(DecodeError::Incomplete)),
        (&[0x80, 0x01], Ok((3, 128))),
        (&[0xff, 0x7f], Ok((3, 16_383))),
        (&[0x80, 0x80, 0x01], Ok((4, 16_384))),
        (&[0xff, 0xff, 0x7f], Ok((4, 2_097_151))),
        (&[0x80, 0x80, 0x80, 0x01], Ok((5, 2_097_152))),
        (&[0xff, 0xff, 0xff, 0x7f], Ok((5, MAX_REMAINING_LENGTH))),
        (&[0xff, 0xff, 0xff], Err(DecodeError::Incomplete)),
        (
            &[0xff, 0xff, 0xff, 0xff],
            Err(DecodeError::RemainingLengthTooLong),
        ),
        (
            &[0x80, 0x80, 0x80, 0x80, 0x01],
            Err(DecodeError::RemainingLengthTooLong),
        ),
    ];
    for (varint, expected) in cases {
        let mut buf = vec![0xc0]; // PINGREQ type; body not needed for the header
        buf.extend_from_slice(varint);
        let got = FixedHeader::parse(&buf, MAX).map(|h| (h.header_len, h.remaining_len));
        assert_eq!(&got, expected, "varint {varint:02x?}");
    }
}

#[test]
fn max_packet_size_is_checked_before_the_body_arrives() {
    let cases: &[(&[u8], usize, Result<usize, DecodeError>)] = &[
        (&[0x30, 0x0a], 12, Err(DecodeError::Incomplete)),
        (
            &[0x30, 0x0a],
            11,
            Err(DecodeError::PacketTooLarge { size: 12, max: 11 }),
        ),
        (
            &[0x30, 0x80, 0x01],
            100,
            Err(DecodeError::PacketTooLarge {
                size: 131,
                max: 100,
            }),
        ),
        (&[0xc0, 0x00], 2, Ok(2)),
        (
            &[0xc0, 0x00],
            1,
            Err(DecodeError::PacketTooLarge { size: 2, max: 1 }),
        ),
    ];
    for (buf, max, expected) in cases {
        assert_eq!(&frame_len(buf, *max), expected, "{buf:02x?} max {max}");
    }
}

#[test]
fn first_byte_checks() {
    let cases: &[(u8, DecodeError)] = &[
        (0x00, DecodeError::ReservedPacketType { byte: 0x00 }),
        (0x36, DecodeError::InvalidQoS),
        (
            0x61,
            DecodeError::InvalidFlags {
                packet_type: PacketType::Pubrel,
                flags: 1,
            },
        ),
        (
            0x80,
            DecodeError::InvalidFlags {
                packet_type: PacketType::Subscribe,
                flags: 0,
            },
        ),
        (
            0x41,
            DecodeError::InvalidFlags {
                packet_type: PacketType::Puback,
                flags: 1,
            },
        ),
    ];
    for (byte, expected) in cases {
        assert_eq!(
            FixedHeader::parse(&[*byte, 0], MAX),
            Err(expected.clone()),
            "{byte:#04x}"
        );
    }
}

#[test]
fn split_frame_takes_one_packet_and_leaves_the_rest() {
    let mut buf = BytesMut::from(&[0xc0, 0x00, 0xd0, 0x00, 0x30][..]);
    let (h, frame) = split_frame(&mut buf, MAX).expect("pingreq");
    assert_eq!(
        (h.packet_type, &frame[..]),
        (PacketType::Pingreq, &[0xc0, 0x00][..])
    );
    let (h, _) = split_frame(&mut buf, MAX).expect("pingresp");
    assert_eq!(h.packet_type, PacketType::Pingresp);
    assert_eq!(split_frame(&mut buf, MAX), Err(DecodeError::Incomplete));
    assert_eq!(&buf[..], &[0x30]);
}

/// The will of a CONNECT: 3.1.1 (flags only) and 5.0 (will properties with a delay and a user property),
/// with username and password after it; and no will when the flag is clear.
#[test]
fn connect_wills() {
    fn connect(level: u8, flags: u8, will_props: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
        if level == 5 {
            body.push(0); // CONNECT properties
        }
        body.extend_from_slice(&[0, 2, b'i', b'd']);
        if let Some(props) = will_props {
            body.push(u8::try_from(props.len()).expect("short"));
            body.extend_from_slice(props);
        }
        if flags & 0x04 != 0 {
            body.extend_from_slice(&[0, 3, b'a', b'/', b'w', 0, 4, b'd', b'e', b'a', b'd']);
        }
        body.extend_from_slice(&[0, 1, b'u', 0, 1, b'p']);
        let mut out = vec![0x10, u8::try_from(body.len()).expect("short")];
        out.extend_from_slice(&body);
        out
    }
    // 3.1.1: will flag, QoS 1, retain; username and password follow.
    let c = Connect::decode(&connect(4, 0x04 | 0x08 | 0x20 | 0xC0 | 0x02, None)).expect("valid");
    let will = c.will.expect("a will");
    assert_eq!(will.publish.topic, "a/w");
    assert_eq!(&will.publish.payload[..], b"dead");
    assert_eq!(will.publish.qos, QoS::AtLeastOnce);
    assert!(will.publish.retain);
    assert_eq!(will.delay_secs, 0);
    // 5.0: QoS 2, will delay 7 s, a user property, message expiry.
    let props: &[u8] = &[
        0x18, 0, 0, 0, 7, 0x26, 0, 1, b'k', 0, 1, b'v', 0x02, 0, 0, 0, 60,
    ];
    let c = Connect::decode(&connect(5, 0x04 | 0x10 | 0xC0, Some(props))).expect("valid");
    let will = c.will.expect("a will");
    assert_eq!(will.delay_secs, 7);
    assert_eq!(will.publish.qos, QoS::ExactlyOnce);
    assert!(!will.publish.retain);
    assert_eq!(
        will.publish.properties.user_properties,
        vec![("k".to_owned(), "v".to_owned())]
    );
    assert_eq!(will.publish.properties.message_expiry_interval, Some(60));
    // No will flag: no will, even with credentials.
    let c = Connect::decode(&connect(4, 0xC0 | 0x02, None)).expect("valid");
    assert_eq!(c.will, None);
    // A will delay is a will property only, and a will topic may not hold wildcards.
    let publish_only: &[u8] = &[0x23, 0, 1];
    assert!(Connect::decode(&connect(5, 0x04, Some(publish_only))).is_err());
    let mut wild = connect(4, 0x04, None);
    let at = wild.iter().position(|&b| b == b'w').expect("topic");
    wild[at] = b'#';
    assert!(Connect::decode(&wild).is_err());
}

/// CONNECT packets as clients send them: MQTT 3.1, 3.1.1 and 5.0 (with properties before the id).
#[test]
fn connect_versions() {
    let v31: &[u8] = &[
        0x10, 0x11, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 3, b'a', b'b',
        b'c',
    ];
    let v311: &[u8] = &[
        0x10, 0x0f, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 3, b'c', b'i', b'd',
    ];
    let v5: &[u8] = &[
        0x10, 0x15, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x00, 0, 10, 5, 0x11, 0, 0, 0, 9, 0, 3, b'x',
        b'y', b'z',
    ];
    let cases: &[(&[u8], &str, u8, Option<ProtocolVersion>, &str, u16, bool)] = &[
        (
            v31,
            "MQIsdp",
            3,
            Some(ProtocolVersion::V3_1),
            "abc",
            60,
            true,
        ),
        (
            v311,
            "MQTT",
            4,
            Some(ProtocolVersion::V3_1_1),
            "cid",
            30,
            true,
        ),
        (v5, "MQTT", 5, Some(ProtocolVersion::V5), "xyz", 10, false),
    ];
    for (bytes, name, level, version, id, keep_alive, clean) in cases {
        let c = Connect::decode(bytes).expect("valid connect");
        assert_eq!(c.protocol_name, *name);
        assert_eq!(c.protocol_level, *level);
        assert_eq!(c.version(), *version);
        assert_eq!(c.client_id, *id);
        assert_eq!(c.keep_alive, *keep_alive);
        assert_eq!(c.clean_start, *clean);
    }
    let bad_name: &[u8] = &[
        0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'X', 4, 0x02, 0, 30, 0, 0,
    ];
    assert_eq!(
        Connect::decode(bad_name),
        Err(DecodeError::UnknownProtocolName {
            name: "MQTX".into()
        })
    );
    assert_eq!(Connect::decode(&v311[..10]), Err(DecodeError::Incomplete));
    assert_eq!(
        Connect::decode(&[0xc0, 0]),
        Err(DecodeError::UnexpectedPacket {
            expected: PacketType::Connect,
            found: PacketType::Pingreq
        })
    );
}

#[test]
fn ack_decode_table() {
    use ProtocolVersion::{V3_1_1, V5};
    let cases: &[(&[u8], ProtocolVersion, Result<Ack, DecodeError>)] = &[
        (
            &[0x40, 2, 0, 7],
            V3_1_1,
            Ok(Ack {
                kind: AckKind::Puback,
                packet_id: 7,
                reason: 0,
            }),
        ),
        (
            &[0x50, 2, 1, 0],
            V3_1_1,
            Ok(Ack {
                kind: AckKind::Pubrec,
                packet_id: 256,
                reason: 0,
            }),
        ),
        (
            &[0x40, 2, 0, 7],
            V5,
            Ok(Ack {
                kind: AckKind::Puback,
                packet_id: 7,
                reason: 0,
            }),
        ),
        (
            &[0x40, 3, 0, 7, 0x10],
            V5,
            Ok(Ack {
                kind: AckKind::Puback,
                packet_id: 7,
                reason: 0x10,
            }),
        ),
        (
            &[0x50, 8, 0, 9, 0x97, 4, 0x1f, 0, 1, b'q'],
            V5,
            Ok(Ack {
                kind: AckKind::Pubrec,
                packet_id: 9,
                reason: 0x97,
            }),
        ),
        (
            &[0x40, 3, 0, 7, 0],
            V3_1_1,
            Err(DecodeError::TrailingBytes { extra: 1 }),
        ),
        (&[0x40, 2, 0, 0], V3_1_1, Err(DecodeError::ZeroPacketId)),
        (
            &[0x40, 1, 0],
            V3_1_1,
            Err(DecodeError::Truncated {
                field: "packet identifier",
            }),
        ),
        (&[0x40, 2, 0], V3_1_1, Err(DecodeError::Incomplete)),
        (
            &[0x40, 4, 0, 7, 0, 9],
            V5,
            Err(DecodeError::Truncated {
                field: "properties",
            }),
        ),
        (
            &[0x70, 2, 0, 1],
            V5,
            Err(DecodeError::UnexpectedPacket {
                expected: PacketType::Puback,
                found: PacketType::Pubcomp,
            }),
        ),
    ];
    for (bytes, version, expected) in cases {
        assert_eq!(
            &Ack::decode(bytes, *version),
            expected,
            "{bytes:02x?} {version:?}"
        );
    }
}

#[test]
fn ack_and_connack_encoders() {
    use ProtocolVersion::{V3_1, V3_1_1, V5};
    let cases: &[(AckKind, u16, u8, ProtocolVersion, &[u8])] = &[
        (AckKind::Puback, 5, 0, V3_1_1, &[0x40, 2, 0, 5]),
        (
            AckKind::Puback,
            5,
            REASON_QUOTA_EXCEEDED,
            V3_1_1,
            &[0x40, 2, 0, 5],
        ),
        (AckKind::Pubrec, 0x1234, 0, V5, &[0x50, 2, 0x12, 0x34]),
        (
            AckKind::Pubrec,
            1,
            REASON_QUOTA_EXCEEDED,
            V5,
            &[0x50, 3, 0, 1, 0x97],
        ),
        (
            AckKind::Puback,
            1,
            REASON_QUOTA_EXCEEDED,
            V5,
            &[0x40, 3, 0, 1, 0x97],
        ),
    ];
    for (kind, id, reason, version, expected) in cases {
        let mut out = BytesMut::new();
        encode_ack(*kind, *id, *reason, *version, &mut out);
        assert_eq!(&out[..], *expected);
        let back = Ack::decode(&out, *version).expect("own ack decodes");
        let wire_reason = if version.has_properties() { *reason } else { 0 };
        assert_eq!(
            back,
            Ack {
                kind: *kind,
                packet_id: *id,
                reason: wire_reason
            }
        );
    }
    let connacks: &[(ProtocolVersion, u8, &[u8])] = &[
        (V3_1, CONNACK_UNACCEPTABLE_PROTOCOL, &[0x20, 2, 0, 1]),
        (V3_1_1, 5, &[0x20, 2, 0, 5]),
        (V5, 0x84, &[0x20, 3, 0, 0x84, 0]),
    ];
    for (version, code, expected) in connacks {
        let mut out = BytesMut::new();
        encode_connack_refusal(*version, *code, &mut out);
        assert_eq!(&out[..], *expected);
    }
}

#[test]
fn publish_field_errors() {
    use ProtocolVersion::{V3_1_1, V5};
    let cases: &[(&[u8], ProtocolVersion, DecodeError)] = &[
        (
            &[0x32, 4, 0, 1, b'a', 0],
            V3_1_1,
            DecodeError::Truncated {
                field: "packet identifier",
            },
        ),
        (
            &[0x32, 5, 0, 1, b'a', 0, 0],
            V3_1_1,
            DecodeError::ZeroPacketId,
        ),
        (
            &[0x30, 3, 0, 1, b'+'],
            V3_1_1,
            DecodeError::ForbiddenCharacter {
                field: "topic name",
            },
        ),
        (
            &[0x30, 3, 0, 1, 0xff],
            V3_1_1,
            DecodeError::InvalidUtf8 {
                field: "topic name",
            },
        ),
        (
            &[0x30, 3, 0, 1, 0],
            V3_1_1,
            DecodeError::ForbiddenCharacter {
                field: "topic name",
            },
        ),
        (&[0x32, 4, 0, 0, 0, 1], V3_1_1, DecodeError::EmptyTopicName),
        (
            &[0x30, 3, 0, 0, b'x'],
            ProtocolVersion::V3_1,
            DecodeError::EmptyTopicName,
        ),
        (
            &[0x30, 6, 0, 1, b'a', 2, 0x23, 0],
            V5,
            DecodeError::Truncated {
                field: "topic alias",
            },
        ),
        (
            &[0x30, 6, 0, 1, b'a', 9, 0x23, 0],
            V5,
            DecodeError::Truncated {
                field: "properties",
            },
        ),
        (
            &[0x30, 7, 0, 1, b'a', 3, 0x23, 0, 0],
            V5,
            DecodeError::InvalidPropertyValue { id: 0x23 },
        ),
        (
            &[0x30, 6, 0, 1, b'a', 2, 0x01, 2],
            V5,
            DecodeError::InvalidPropertyValue { id: 0x01 },
        ),
        (
            &[0x30, 6, 0, 1, b'a', 2, 0x11, 2],
            V5,
            DecodeError::InvalidProperty { id: 0x11 },
        ),
        (
            &[0x30, 8, 0, 1, b'a', 4, 0x01, 1, 0x01, 0],
            V5,
            DecodeError::DuplicateProperty { id: 0x01 },
        ),
        (
            &[0x30, 9, 0, 1, b'a', 5, 0x0b, 0xff, 0xff, 0xff, 0xff],
            V5,
            DecodeError::VarIntTooLong {
                field: "subscription identifier",
            },
        ),
    ];
    for (bytes, version, expected) in cases {
        let frame = Bytes::copy_from_slice(bytes);
        assert_eq!(
            Publish::decode(&frame, *version),
            Err(expected.clone()),
            "{bytes:02x?}"
        );
    }
}

fn publish(topic: &str, alias: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.to_owned(),
        packet_id: Some(1),
        properties: PublishProperties {
            topic_alias: alias,
            ..PublishProperties::default()
        },
        payload: Bytes::new(),
    }
}

#[test]
fn topic_alias_resolution() {
    let mut aliases = TopicAliases::new();
    // (topic, alias, expected result, expected topic afterwards)
    let steps: &[(&str, Option<u16>, Result<(), AliasError>, &str)] = &[
        ("", Some(1), Err(AliasError::UnknownAlias { alias: 1 }), ""),
        ("", None, Err(AliasError::EmptyTopic), ""),
        ("a/b", Some(0), Err(AliasError::ZeroAlias), "a/b"),
        ("a/b", Some(1), Ok(()), "a/b"),
        ("", Some(1), Ok(()), "a/b"),
        ("c", Some(1), Ok(()), "c"),
        ("", Some(1), Ok(()), "c"),
        ("d", None, Ok(()), "d"),
        ("", Some(2), Err(AliasError::UnknownAlias { alias: 2 }), ""),
    ];
    for (i, (topic, alias, expected, after)) in steps.iter().enumerate() {
        let mut p = publish(topic, *alias);
        assert_eq!(aliases.resolve(&mut p), *expected, "step {i}");
        assert_eq!(p.topic, *after, "step {i}");
        if expected.is_ok() {
            assert_eq!(p.properties.topic_alias, None, "step {i}: alias cleared");
        }
    }
}

fn mqtt_string() -> impl Strategy<Value = String> {
    "[a-z0-9/ _é-]{0,24}"
}

fn properties() -> impl Strategy<Value = PublishProperties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(1u16..),
        proptest::option::of(mqtt_string()),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::collection::vec((mqtt_string(), mqtt_string()), 0..4),
        proptest::collection::vec(1u32..=268_435_455, 0..3),
        proptest::option::of(mqtt_string()),
    )
        .prop_map(
            |(pfi, expiry, alias, response, corr, user, subs, content)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                topic_alias: alias,
                response_topic: response,
                correlation_data: corr.map(Bytes::from),
                user_properties: user,
                subscription_identifiers: subs,
                content_type: content,
            },
        )
}

fn publishes(with_properties: bool) -> impl Strategy<Value = Publish> {
    let props = if with_properties {
        properties().boxed()
    } else {
        Just(PublishProperties::default()).boxed()
    };
    // Only MQTT 5 may send an empty topic name (with a topic alias); 3.1.1 topics are never empty.
    let topic = if with_properties {
        mqtt_string().boxed()
    } else {
        "[a-z0-9/ _é-]{1,24}".boxed()
    };
    (
        any::<bool>(),
        0u8..=2,
        any::<bool>(),
        topic,
        1u16..,
        props,
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(dup, qos, retain, topic, id, properties, payload)| {
            let qos = QoS::from_code(qos).expect("strategy yields 0..=2");
            Publish {
                dup,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload: Bytes::from(payload),
            }
        })
}

proptest! {
    #[test]
    fn publish_v4_round_trips(p in publishes(false)) {
        let mut out = BytesMut::new();
        encode_publish(&p, ProtocolVersion::V3_1_1, &mut out).expect("encodable");
        let frame = out.freeze();
        prop_assert_eq!(frame_len(&frame, MAX), Ok(frame.len()));
        prop_assert_eq!(Publish::decode(&frame, ProtocolVersion::V3_1_1), Ok(p));
    }

    #[test]
    fn publish_v5_round_trips(p in publishes(true)) {
        let mut out = BytesMut::new();
        encode_publish(&p, ProtocolVersion::V5, &mut out).expect("encodable");
        let frame = out.freeze();
        prop_assert_eq!(frame_len(&frame, MAX), Ok(frame.len()));
        prop_assert_eq!(Publish::decode(&frame, ProtocolVersion::V5), Ok(p));
    }

    #[test]
    fn truncated_packets_are_incomplete(p in publishes(true), cut in any::<prop::sample::Index>()) {
        let mut out = BytesMut::new();
        encode_publish(&p, ProtocolVersion::V5, &mut out).expect("encodable");
        let cut = cut.index(out.len());
        let prefix = out.split_to(cut).freeze();
        prop_assert_eq!(frame_len(&prefix, MAX), Err(DecodeError::Incomplete));
        prop_assert_eq!(Publish::decode(&prefix, ProtocolVersion::V5), Err(DecodeError::Incomplete));
        let mut buf = BytesMut::from(&prefix[..]);
        prop_assert_eq!(split_frame(&mut buf, MAX), Err(DecodeError::Incomplete));
        prop_assert_eq!(buf.len(), cut);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let frame = Bytes::from(bytes);
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let _ = Publish::decode(&frame, version);
            let _ = Ack::decode(&frame, version);
        }
        let _ = Connect::decode(&frame);
        let mut buf = BytesMut::from(&frame[..]);
        while let Ok((_, f)) = split_frame(&mut buf, 1024) {
            prop_assert!(!f.is_empty());
        }
    }

    /// Random bodies behind a valid header exercise the field parsers, not just the header check.
    #[test]
    fn random_bodies_never_panic(first in 0u8..=0xff, body in proptest::collection::vec(any::<u8>(), 0..100)) {
        let mut buf = vec![first];
        let len = u8::try_from(body.len()).expect("body < 128");
        buf.push(len);
        buf.extend_from_slice(&body);
        let frame = Bytes::from(buf);
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            if let Ok(p) = Publish::decode(&frame, version) {
                prop_assert!(p.payload.len() <= body.len());
            }
            let _ = Ack::decode(&frame, version);
        }
        let _ = Connect::decode(&frame);
    }
}

#[test]
fn subscribe_and_unsubscribe_filters_decode() {
    // SUBSCRIBE id 7: "a/#" QoS 1, "b/+/c" QoS 2.
    let v4_sub = [
        0x82, 16, 0, 7, 0, 3, b'a', b'/', b'#', 1, 0, 5, b'b', b'/', b'+', b'/', b'c', 2,
    ];
    let got = Filters::decode(&v4_sub, ProtocolVersion::V3_1_1).expect("valid");
    assert_eq!(got.packet_id, 7);
    assert_eq!(got.filters, ["a/#", "b/+/c"]);
    // v5: a property block (subscription identifier 5) before the filters.
    let v5_sub = [0x82, 10, 0, 8, 2, 0x0B, 5, 0, 2, b'x', b'/', 0];
    let got = Filters::decode(&v5_sub, ProtocolVersion::V5).expect("valid");
    assert_eq!((got.packet_id, got.filters), (8, vec!["x/".to_owned()]));
    // UNSUBSCRIBE has no options byte.
    let unsub = [0xA2, 7, 0, 9, 0, 3, b'a', b'/', b'b'];
    let got = Filters::decode(&unsub, ProtocolVersion::V3_1_1).expect("valid");
    assert_eq!(got.filters, ["a/b"]);
    // No filter at all, a truncated filter, packet id 0, another packet type.
    assert!(Filters::decode(&[0x82, 2, 0, 1], ProtocolVersion::V3_1_1).is_err());
    assert!(Filters::decode(&[0x82, 5, 0, 1, 0, 3, b'a'], ProtocolVersion::V3_1_1).is_err());
    assert_eq!(
        Filters::decode(&[0x82, 6, 0, 0, 0, 1, b'a', 0], ProtocolVersion::V3_1_1),
        Err(DecodeError::ZeroPacketId)
    );
    assert!(matches!(
        Filters::decode(&[0x30, 3, 0, 1, b'a'], ProtocolVersion::V3_1_1),
        Err(DecodeError::UnexpectedPacket { .. })
    ));
}

#[test]
fn a_subscribe_keeps_only_the_allowed_filters_and_the_suback_codes_read_back() {
    // SUBSCRIBE id 7: "a/#" QoS 1, "b/+/c" QoS 2.
    let v4_sub = [
        0x82, 16, 0, 7, 0, 3, b'a', b'/', b'#', 1, 0, 5, b'b', b'/', b'+', b'/', b'c', 2,
    ];
    let kept = subscribe_keeping(&v4_sub, ProtocolVersion::V3_1_1, &[false, true])
        .expect("valid")
        .expect("one kept");
    let got = Filters::decode(&kept, ProtocolVersion::V3_1_1).expect("valid");
    assert_eq!(
        (got.packet_id, got.filters, got.options),
        (7, vec!["b/+/c".to_owned()], vec![2])
    );
    assert_eq!(
        subscribe_keeping(&v4_sub, ProtocolVersion::V3_1_1, &[false, false]).expect("valid"),
        None
    );
    assert_eq!(
        subscribe_keeping(&v4_sub, ProtocolVersion::V3_1_1, &[true]).expect("valid"),
        None,
        "a mask that does not fit the packet"
    );
    // v5: the property block (subscription identifier 5) stays.
    let v5_sub = [
        0x82, 14, 0, 8, 2, 0x0B, 5, 0, 2, b'x', b'/', 0, 0, 1, b'y', 1,
    ];
    let kept = subscribe_keeping(&v5_sub, ProtocolVersion::V5, &[true, false])
        .expect("valid")
        .expect("one kept");
    assert_eq!(
        &kept[..],
        &[0x82, 10, 0, 8, 2, 0x0B, 5, 0, 2, b'x', b'/', 0]
    );
    let mut suback = BytesMut::new();
    encode_suback(ProtocolVersion::V5, 8, &[1, 0x87], &mut suback).expect("encodes");
    assert_eq!(
        suback_codes(&suback, ProtocolVersion::V5),
        Ok((8, vec![1, 0x87]))
    );
    let mut suback = BytesMut::new();
    encode_suback(ProtocolVersion::V3_1_1, 9, &[0x80], &mut suback).expect("encodes");
    assert_eq!(
        suback_codes(&suback, ProtocolVersion::V3_1_1),
        Ok((9, vec![0x80]))
    );
}

/// A CONNECT frame built field by field: protocol `level` (4 or 5), optional will and login; v5 frames
/// carry a session expiry property, and a will property block when there is a will.
fn connect_frame(
    level: u8,
    client_id: &str,
    will: Option<(&str, &[u8])>,
    username: Option<&[u8]>,
    password: Option<&[u8]>,
) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u16::try_from(bytes.len()).expect("short").to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut flags = 0x02;
    if will.is_some() {
        flags |= 0x04 | 0x08; // will, QoS 1
    }
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 30];
    if level == 5 {
        body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]); // session expiry 60 s
    }
    field(&mut body, client_id.as_bytes());
    if let Some((topic, payload)) = will {
        if level == 5 {
            body.extend_from_slice(&[5, 0x18, 0, 0, 0, 3]); // will delay 3 s
        }
        field(&mut body, topic.as_bytes());
        field(&mut body, payload);
    }
    if let Some(u) = username {
        field(&mut body, u);
    }
    if let Some(p) = password {
        field(&mut body, p);
    }
    let mut out = vec![0x10];
    let mut len = BytesMut::new();
    encode::put_remaining_length(&mut len, body.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&body);
    out
}

#[test]
fn connect_login_is_found_and_replaced() {
    let frame = connect_frame(4, "c1", Some(("a/w", b"dead")), Some(b"user"), Some(b"pw"));
    let at = ConnectLogin::locate(&frame).expect("valid");
    assert_eq!(at.username.map(|r| &frame[r]), Some(&b"user"[..]));
    assert_eq!(at.password.map(|r| &frame[r]), Some(&b"pw"[..]));
    let replaced = encode::replace_connect_login(&frame, b"internal", b"s3cret").expect("fits");
    let expected = connect_frame(
        4,
        "c1",
        Some(("a/w", b"dead")),
        Some(b"internal"),
        Some(b"s3cret"),
    );
    assert_eq!(&replaced[..], &expected[..]);
    // Not a CONNECT, or cut short: refused, not guessed at.
    assert!(encode::replace_connect_login(&[0xc0, 0], b"u", b"p").is_err());
    assert!(encode::replace_connect_login(&frame[..frame.len() - 1], b"u", b"p").is_err());
}

proptest! {
    /// Whatever login a client sent (none, a username only, both), the replaced CONNECT decodes to the
    /// same client id, flags, will and properties, and carries exactly the new login.
    #[test]
    fn connect_login_replacement_keeps_everything_else(
        v5 in any::<bool>(),
        client_id in "[a-z0-9]{0,30}",
        will in proptest::option::of(("[a-z/]{1,20}", proptest::collection::vec(any::<u8>(), 0..300))),
        username in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        password in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        new_user in proptest::collection::vec(any::<u8>(), 0..40),
        new_password in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let level = if v5 { 5 } else { 4 };
        let will = will.as_ref().map(|(t, p)| (t.as_str(), p.as_slice()));
        let frame = connect_frame(level, &client_id, will, username.as_deref(), password.as_deref());
        let replaced = encode::replace_connect_login(&frame, &new_user, &new_password).expect("fits");
        prop_assert_eq!(frame_len(&replaced, MAX), Ok(replaced.len()));
        prop_assert_eq!(Connect::decode(&replaced), Connect::decode(&frame));
        let at = ConnectLogin::locate(&replaced).expect("valid");
        prop_assert_eq!(at.username.map(|r| replaced[r].to_vec()), Some(new_user.clone()));
        prop_assert_eq!(at.password.map(|r| replaced[r].to_vec()), Some(new_password.clone()));
        let expected = connect_frame(level, &client_id, will, Some(&new_user), Some(&new_password));
        prop_assert_eq!(&replaced[..], &expected[..]);
    }
}
