//! proptest strategies for envelopes and frames, shared by the envelope and codec tests.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::{Capabilities, ConfigRejectReason, ConfigRejection, Frame, GoAwayCode, VersionRange};
use crate::envelope::{Envelope, Properties, QoS, TraceContext};

/// Short strings with multi-byte characters, so UTF-8 handling is exercised without huge inputs.
fn text() -> impl Strategy<Value = String> {
    "[a-z0-9/+#é€ -]{0,24}"
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

pub(crate) fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn arb_properties() -> impl Strategy<Value = Properties> {
    (
        vec((text(), text()), 0..4),
        option::of(text()),
        option::of(text()),
        option::of(bytes(16)),
        option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(user, content_type, response_topic, correlation_data, message_expiry, utf8)| {
                Properties {
                    user,
                    content_type,
                    response_topic,
                    correlation_data,
                    message_expiry,
                    payload_format_utf8: utf8,
                }
            },
        )
}

fn arb_trace() -> impl Strategy<Value = TraceContext> {
    (text(), option::of(text())).prop_map(|(traceparent, tracestate)| TraceContext {
        traceparent,
        tracestate,
    })
}

pub(crate) fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (
        text(),
        any::<u64>(),
        text(),
        bytes(64),
        arb_qos(),
        any::<bool>(),
        arb_properties(),
        option::of(arb_trace()),
        any::<u64>(),
    )
        .prop_map(
            |(origin, seq, topic, payload, qos, retain, properties, trace, enqueued_at_ms)| {
                Envelope {
                    origin,
                    seq,
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    trace,
                    enqueued_at_ms,
                }
            },
        )
}

fn arb_versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn arb_caps() -> impl Strategy<Value = Capabilities> {
    any::<u64>().prop_map(Capabilities::from_bits)
}

/// Codes as decoding produces them: `Unknown` only for values no named variant has.
fn arb_goaway_code() -> impl Strategy<Value = GoAwayCode> {
    any::<u16>().prop_map(GoAwayCode::from_code)
}

fn arb_config_result() -> impl Strategy<Value = Result<(), ConfigRejection>> {
    prop_oneof![
        Just(Ok(())),
        (any::<u16>(), text()).prop_map(|(code, detail)| Err(ConfigRejection {
            reason: ConfigRejectReason::from_code(code),
            detail,
        })),
    ]
}

/// Every frame kind, with arbitrary contents.
pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            arb_versions(),
            arb_caps(),
            text(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>()
        )
            .prop_map(
                |(
                    versions,
                    capabilities,
                    agent_name,
                    incarnation,
                    last_acked,
                    config_version,
                    lane,
                )| {
                    Frame::Hello {
                        versions,
                        capabilities,
                        agent_name,
                        incarnation,
                        last_acked,
                        config_version,
                        lane,
                        agent_version: format!("0.{incarnation}.0"),
                        window: u32::from(lane),
                    }
                }
            ),
        (
            any::<u16>(),
            arb_caps(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u16>(),
            text()
        )
            .prop_map(
                |(
                    version,
                    capabilities,
                    max_frame_size,
                    hub_high_water,
                    config_version,
                    max_message_size,
                    max_topic_len,
                    hub_version,
                )| {
                    Frame::Welcome {
                        version,
                        capabilities,
                        max_frame_size,
                        hub_high_water,
                        config_version,
                        max_message_size,
                        max_topic_len,
                        // Only a version 3 (or later) Welcome carries it.
                        hub_version: if version >= 3 {
                            hub_version
                        } else {
                            String::new()
                        },
                    }
                }
            ),
        vec(arb_envelope(), 0..5).prop_map(|entries| Frame::Batch { entries }),
        any::<u64>().prop_map(|upto| Frame::Ack { upto }),
        (any::<u64>(), text()).prop_map(|(version, body)| Frame::ConfigPush { version, body }),
        (any::<u64>(), arb_config_result())
            .prop_map(|(version, result)| Frame::ConfigAck { version, result }),
        vec(arb_envelope(), 0..5).prop_map(|entries| Frame::Downlink { entries }),
        any::<u64>().prop_map(|upto| Frame::DownlinkAck { upto }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (arb_goaway_code(), text(), option::of(any::<u32>())).prop_map(
            |(code, reason, retry_after_ms)| Frame::GoAway {
                code,
                reason,
                retry_after_ms
            }
        ),
        (any::<u64>(), any::<u8>(), text()).prop_map(|(seq, reason_code, detail)| Frame::Refused {
            seq,
            reason_code,
            detail
        }),
    ]
}
