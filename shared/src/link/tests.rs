//! One test per frame and edge case each end handles; the pair harness (`shared/tests/link_pair.rs`) covers
//! the two ends together under faults.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::agent::{AgentAction, AgentConfig, AgentEnd, AgentLink, QueueMarks};
use super::hub::{Admission, ConfigOffer, HubConfig, HubConn, HubEnd, HubEvent, Resume};
use super::{ConnId, Keepalive, ProtocolViolation, Refusal};
use crate::envelope::{Envelope, Properties, QoS};
use crate::wire::{
    Capabilities, ConfigRejectReason, ConfigRejection, Frame, FrameType, GoAwayCode, VersionRange,
    PROTOCOL_VERSION, SUPPORTED,
};

fn env(seq: u64) -> Envelope {
    Envelope {
        origin: "line1".into(),
        seq,
        topic: "t".into(),
        payload: Bytes::from_static(b"p"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        trace: None,
        enqueued_at_ms: 0,
    }
}

fn batch(seqs: &[u64]) -> Vec<Envelope> {
    seqs.iter().map(|&s| env(s)).collect()
}

fn agent_cfg(capabilities: Capabilities) -> AgentConfig {
    AgentConfig {
        agent_name: "line1".into(),
        lane: 0,
        capabilities,
        window: 2,
        handshake_timeout: Duration::from_secs(10),
        versions: SUPPORTED,
        keepalive: None,
        ack_timeout: None,
    }
}

fn welcome(hub_high_water: u64, capabilities: Capabilities) -> Frame {
    Frame::Welcome {
        version: PROTOCOL_VERSION,
        capabilities,
        max_frame_size: 4096,
        hub_high_water,
        config_version: 0,
        max_message_size: 1024,
        max_topic_len: 100,
        hub_version: "9.9.9".into(),
    }
}

fn marks(acked: u64, written: u64) -> QueueMarks {
    QueueMarks {
        incarnation: 7,
        acked,
        written,
    }
}

fn transmits_a(a: &mut AgentLink) -> Vec<Frame> {
    std::iter::from_fn(|| a.poll_transmit()).collect()
}

fn actions(a: &mut AgentLink) -> Vec<AgentAction> {
    std::iter::from_fn(|| a.poll_action()).collect()
}

/// An agent welcomed on connection 1 with the given queue marks, its output drained.
fn open_agent(caps: Capabilities, acked: u64, written: u64, now: Instant) -> (AgentLink, ConnId) {
    let mut a = AgentLink::new(agent_cfg(caps), 3);
    let c = a.connect(now, marks(acked, written));
    a.handle_frame(c, welcome(0, caps), now);
    transmits_a(&mut a);
    actions(&mut a);
    (a, c)
}

fn closed_with(actions: &[AgentAction]) -> Option<&AgentEnd> {
    actions.iter().find_map(|a| match a {
        AgentAction::Closed { end, .. } => Some(end),
        _ => None,
    })
}

fn go_away_code(frames: &[Frame]) -> Option<(GoAwayCode, String, Option<u32>)> {
    frames.iter().find_map(|f| match f {
        Frame::GoAway {
            code,
            reason,
            retry_after_ms,
        } => Some((*code, reason.clone(), *retry_after_ms)),
        _ => None,
    })
}

#[test]
fn agent_hello_carries_the_queue_and_config() {
    let now = Instant::now();
    let mut a = AgentLink::new(agent_cfg(Capabilities::RETRY_AFTER), 3);
    let c = a.connect(now, marks(5, 9));
    assert_eq!(
        transmits_a(&mut a),
        [Frame::Hello {
            versions: SUPPORTED,
            capabilities: Capabilities::RETRY_AFTER,
            agent_name: "line1".into(),
            incarnation: 7,
            last_acked: 5,
            config_version: 3,
            lane: 0,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            window: 2,
        }]
    );
    assert_eq!(a.conn(), Some(c));
    assert!(!a.is_open());
    assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(10)));
}

#[test]
fn agent_resumes_from_the_hub_high_water_mark() {
    let now = Instant::now();
    let mut a = AgentLink::new(agent_cfg(Capabilities::EMPTY), 0);
    let c = a.connect(now, marks(2, 9));
    a.handle_frame(c, welcome(6, Capabilities::DOWNLINK), now);
    let got = actions(&mut a);
    assert!(matches!(
        &got[0],
        AgentAction::Welcomed { hub_high_water: 6, capabilities, limits, .. }
            if *capabilities == Capabilities::EMPTY && limits.max_frame_size == 4096
    ));
    assert_eq!(got[1], AgentAction::AckUpTo { upto: 6 });
    assert_eq!(a.next_send(), Some(7));
    // A mark at or below the queue's own acknowledges nothing.
    let c = a.connect(now, marks(6, 9));
    a.handle_frame(c, welcome(4, Capabilities::EMPTY), now);
    assert_eq!(actions(&mut a).len(), 1);
    assert_eq!(a.next_send(), Some(7));
}

#[test]
fn agent_restarts_above_a_hub_that_saw_more_than_the_queue_wrote() {
    let now = Instant::now();
    let mut a = AgentLink::new(agent_cfg(Capabilities::EMPTY), 0);
    let c = a.connect(now, marks(2, 9));
    transmits_a(&mut a);
    a.handle_frame(c, welcome(12, Capabilities::EMPTY), now);
    let got = actions(&mut a);
    assert_eq!(
        closed_with(&got),
        Some(&AgentEnd::Restarted {
            hub_high_water: 12,
            written: 9
        })
    );
    assert!(!got.iter().any(|a| matches!(a, AgentAction::AckUpTo { .. })));
    assert!(
        transmits_a(&mut a).is_empty(),
        "no GoAway: the connection just ends"
    );
    assert_eq!(a.conn(), None);
}

#[test]
fn agent_refuses_a_version_it_does_not_speak() {
    let now = Instant::now();
    let mut a = AgentLink::new(agent_cfg(Capabilities::EMPTY), 0);
    let c = a.connect(now, marks(0, 0));
    transmits_a(&mut a);
    let mut w = welcome(0, Capabilities::EMPTY);
    if let Frame::Welcome { version, .. } = &mut w {
        *version = 1;
    }
    a.handle_frame(c, w, now);
    let (code, reason, _) = go_away_code(&transmits_a(&mut a)).expect("GoAway");
    assert_eq!(code, GoAwayCode::ProtocolError);
    assert!(reason.contains("version 1"), "{reason}");
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Protocol(ProtocolViolation::UnsupportedVersion {
            version: 1
        }))
    );
}

#[test]
fn agent_handshake_errors() {
    let now = Instant::now();
    // Anything but Welcome or GoAway first is a protocol error.
    let mut a = AgentLink::new(agent_cfg(Capabilities::EMPTY), 0);
    let c = a.connect(now, marks(0, 0));
    a.handle_frame(c, Frame::Ack { upto: 1 }, now);
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Protocol(ProtocolViolation::Unexpected {
            frame: FrameType::Ack,
            state: "waiting for Welcome"
        }))
    );
    // A refusal with retry-after.
    let c = a.connect(now, marks(0, 0));
    a.handle_frame(
        c,
        Frame::GoAway {
            code: GoAwayCode::Unavailable,
            reason: "broker down".into(),
            retry_after_ms: Some(1000),
        },
        now,
    );
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::GoAway {
            code: GoAwayCode::Unavailable,
            reason: "broker down".into(),
            retry_after: Some(Duration::from_secs(1)),
        })
    );
    // No answer.
    let c = a.connect(now, marks(0, 0));
    a.handle_timeout(now + Duration::from_secs(9));
    assert!(actions(&mut a).is_empty());
    a.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::HandshakeTimeout {
            after: Duration::from_secs(10)
        })
    );
    assert_eq!(a.conn(), None);
    let _ = c;
}

#[test]
fn agent_window_and_acks() {
    let now = Instant::now();
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 10, now);
    assert_eq!(a.next_send(), Some(1));
    a.batches_sent(now, 3, [3]);
    assert_eq!(a.next_send(), Some(4));
    // One read split into two frames fills the window of 2.
    a.batches_sent(now, 8, [5, 8]);
    assert_eq!(a.next_send(), None);
    assert_eq!(a.inflight_batches(), 3);
    a.handle_frame(c, Frame::Ack { upto: 5 }, now);
    assert_eq!(actions(&mut a), [AgentAction::AckUpTo { upto: 5 }]);
    assert_eq!(a.next_send(), Some(9));
    // A repeated ack moves nothing.
    a.handle_frame(c, Frame::Ack { upto: 5 }, now);
    assert!(actions(&mut a).is_empty());
    assert!(a.is_healthy(now, Duration::from_secs(5)));
    // Nothing more stored.
    a.batches_sent(now, 10, [10]);
    a.handle_frame(c, Frame::Ack { upto: 10 }, now);
    actions(&mut a);
    assert_eq!(a.next_send(), None);
    a.queue_written(12);
    assert_eq!(a.next_send(), Some(11));
}

#[test]
fn agent_refuses_an_ack_beyond_what_it_sent() {
    let now = Instant::now();
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 10, now);
    a.batches_sent(now, 3, [3]);
    a.handle_frame(c, Frame::Ack { upto: 4 }, now);
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Protocol(ProtocolViolation::AckBeyondSent {
            upto: 4,
            sent: 3
        }))
    );
    let (code, reason, _) = go_away_code(&transmits_a(&mut a)).expect("GoAway");
    assert_eq!(code, GoAwayCode::ProtocolError);
    assert_eq!(reason, "hub acknowledged up to 4 but only 3 was sent");
}

#[test]
fn agent_dead_letters_a_refusal_before_the_ack() {
    let now = Instant::now();
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 10, now);
    a.batches_sent(now, 3, [3]);
    a.handle_frame(
        c,
        Frame::Refused {
            seq: 2,
            reason_code: 0x87,
            detail: "no".into(),
        },
        now,
    );
    a.handle_frame(c, Frame::Ack { upto: 3 }, now);
    assert_eq!(
        actions(&mut a),
        [
            AgentAction::DeadLetter {
                seq: 2,
                reason_code: 0x87,
                detail: "no".into()
            },
            AgentAction::AckUpTo { upto: 3 }
        ]
    );
    a.handle_frame(
        c,
        Frame::Refused {
            seq: 9,
            reason_code: 0x87,
            detail: "no".into(),
        },
        now,
    );
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Protocol(ProtocolViolation::RefusedBeyondSent {
            seq: 9,
            sent: 3
        }))
    );
}

#[test]
fn agent_ignores_an_old_connection() {
    let now = Instant::now();
    let (mut a, old) = open_agent(Capabilities::EMPTY, 0, 10, now);
    a.batches_sent(now, 3, [3]);
    let new = a.connect(now, marks(0, 10));
    transmits_a(&mut a);
    // A late Ack or GoAway of the old connection moves nothing and ends nothing.
    a.handle_frame(old, Frame::Ack { upto: 3 }, now);
    a.handle_frame(
        old,
        Frame::GoAway {
            code: GoAwayCode::Replaced,
            reason: String::new(),
            retry_after_ms: None,
        },
        now,
    );
    a.connection_lost(old);
    a.downlink_delivered(old, 5);
    assert!(actions(&mut a).is_empty());
    assert!(transmits_a(&mut a).is_empty());
    assert_eq!(a.conn(), Some(new));
}

#[test]
fn agent_answers_pings_and_gives_up_without_pongs() {
    let now = Instant::now();
    let mut cfg = agent_cfg(Capabilities::EMPTY);
    cfg.keepalive = Some(Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
    });
    let mut a = AgentLink::new(cfg, 0);
    let c = a.connect(now, marks(0, 0));
    a.handle_frame(c, welcome(0, Capabilities::EMPTY), now);
    transmits_a(&mut a);
    a.handle_frame(c, Frame::Ping { nonce: 42 }, now);
    assert_eq!(transmits_a(&mut a), [Frame::Pong { nonce: 42 }]);
    let t1 = now + Duration::from_secs(1);
    assert_eq!(a.poll_timeout(), Some(t1));
    a.handle_timeout(t1);
    let [Frame::Ping { nonce }] = transmits_a(&mut a)[..] else {
        panic!("one Ping")
    };
    a.handle_frame(c, Frame::Pong { nonce }, t1);
    let t2 = t1 + Duration::from_secs(1);
    assert_eq!(a.poll_timeout(), Some(t2));
    a.handle_timeout(t2);
    transmits_a(&mut a);
    a.handle_timeout(t2 + Duration::from_secs(2));
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::KeepaliveTimeout)
    );
}

#[test]
fn agent_config_push_is_acknowledged_after_the_outcome() {
    let now = Instant::now();
    // Not negotiated: a protocol error.
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 0, now);
    let push = |version: u64| Frame::ConfigPush {
        version,
        body: format!("v{version}"),
    };
    a.handle_frame(c, push(4), now);
    assert!(matches!(
        closed_with(&actions(&mut a)),
        Some(AgentEnd::Protocol(ProtocolViolation::Unexpected {
            frame: FrameType::ConfigPush,
            ..
        }))
    ));

    let (mut a, c) = open_agent(Capabilities::CONFIG_PUSH, 0, 0, now);
    a.handle_frame(c, push(4), now);
    assert_eq!(
        actions(&mut a),
        [AgentAction::ApplyConfig {
            version: 4,
            body: "v4".into()
        }]
    );
    assert!(
        transmits_a(&mut a).is_empty(),
        "no ConfigAck before the outcome"
    );
    // The same push again (a reconnect) while applying: answered by the one outcome.
    a.handle_frame(c, push(4), now);
    assert!(actions(&mut a).is_empty());
    a.config_applied(4, Ok(()));
    assert_eq!(
        transmits_a(&mut a),
        [Frame::ConfigAck {
            version: 4,
            result: Ok(())
        }]
    );
    assert_eq!(a.config_version(), 4);
    // Already running it: acknowledged at once; older: stale.
    a.handle_frame(c, push(4), now);
    a.handle_frame(c, push(2), now);
    let acks = transmits_a(&mut a);
    assert_eq!(
        acks[0],
        Frame::ConfigAck {
            version: 4,
            result: Ok(())
        }
    );
    assert!(matches!(
        &acks[1],
        Frame::ConfigAck {
            version: 2,
            result: Err(ConfigRejection {
                reason: ConfigRejectReason::Stale,
                ..
            })
        }
    ));
    // A refusal keeps the running version and is reported.
    a.handle_frame(c, push(5), now);
    actions(&mut a);
    let rejection = ConfigRejection {
        reason: ConfigRejectReason::Invalid,
        detail: "bad".into(),
    };
    a.config_applied(5, Err(rejection.clone()));
    assert_eq!(a.config_version(), 4);
    assert_eq!(
        transmits_a(&mut a),
        [Frame::ConfigAck {
            version: 5,
            result: Err(rejection)
        }]
    );
    // An outcome without a connection is not sent; the next Hello carries the running version.
    a.handle_frame(c, push(6), now);
    actions(&mut a);
    a.connection_lost(c);
    a.config_applied(6, Ok(()));
    assert!(transmits_a(&mut a).is_empty());
    a.connect(now, marks(0, 0));
    assert!(matches!(
        transmits_a(&mut a)[..],
        [Frame::Hello {
            config_version: 6,
            lane: 0,
            ..
        }]
    ));
}

#[test]
fn agent_downlink_is_acknowledged_after_delivery() {
    let now = Instant::now();
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 0, now);
    a.handle_frame(
        c,
        Frame::Downlink {
            entries: batch(&[1]),
        },
        now,
    );
    assert!(matches!(
        closed_with(&actions(&mut a)),
        Some(AgentEnd::Protocol(ProtocolViolation::Unexpected {
            frame: FrameType::Downlink,
            ..
        }))
    ));

    let (mut a, c) = open_agent(Capabilities::DOWNLINK, 0, 0, now);
    a.handle_frame(
        c,
        Frame::Downlink {
            entries: batch(&[3, 4]),
        },
        now,
    );
    assert_eq!(
        actions(&mut a),
        [AgentAction::DeliverDownlink {
            conn: c,
            entries: batch(&[3, 4])
        }]
    );
    assert!(transmits_a(&mut a).is_empty());
    a.downlink_delivered(c, 3);
    a.downlink_delivered(c, 4);
    a.downlink_delivered(c, 4);
    assert_eq!(
        transmits_a(&mut a),
        [
            Frame::DownlinkAck { upto: 3 },
            Frame::DownlinkAck { upto: 4 }
        ]
    );
    // Never more than received.
    a.downlink_delivered(c, 9);
    assert!(transmits_a(&mut a).is_empty());
    // Seqs go forward within a connection.
    a.handle_frame(
        c,
        Frame::Downlink {
            entries: batch(&[4]),
        },
        now,
    );
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Protocol(ProtocolViolation::SeqNotIncreasing {
            seq: 4,
            after: 4
        }))
    );
}

#[test]
fn agent_shutdown_drains_then_says_goaway() {
    let now = Instant::now();
    let (mut a, c) = open_agent(Capabilities::EMPTY, 0, 10, now);
    a.batches_sent(now, 3, [3]);
    let deadline = now + Duration::from_secs(5);
    a.shutdown(now, deadline);
    assert_eq!(a.next_send(), None, "no new batches while stopping");
    assert!(actions(&mut a).is_empty());
    assert_eq!(a.poll_timeout(), Some(deadline));
    a.handle_frame(c, Frame::Ack { upto: 3 }, now);
    let got = actions(&mut a);
    assert_eq!(
        closed_with(&got),
        Some(&AgentEnd::Shutdown { unacked_batches: 0 })
    );
    assert_eq!(
        go_away_code(&transmits_a(&mut a)).map(|g| g.0),
        Some(GoAwayCode::Normal)
    );
    // At the deadline with batches unacknowledged.
    let (mut a, _) = open_agent(Capabilities::EMPTY, 0, 10, now);
    a.batches_sent(now, 3, [3]);
    a.shutdown(now, deadline);
    a.handle_timeout(deadline);
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Shutdown { unacked_batches: 1 })
    );
}

// The hub.

fn hub_cfg(capabilities: Capabilities) -> HubConfig {
    HubConfig {
        max_frame_size: 4096,
        max_message_size: 1024,
        capabilities,
        hello_timeout: Duration::from_secs(10),
        versions: SUPPORTED,
        software_version: "9.9.9".into(),
        keepalive: None,
        downlink_window: 2,
        downlink_ack_timeout: None,
        ack_delay: Duration::from_millis(5),
    }
}

fn hello(capabilities: Capabilities, incarnation: u64, config_version: u64) -> Frame {
    Frame::Hello {
        versions: SUPPORTED,
        capabilities,
        agent_name: "line1".into(),
        incarnation,
        last_acked: 0,
        config_version,
        lane: 0,
        agent_version: String::new(),
        // An agent that states no window: every batch is acknowledged at once.
        window: 0,
    }
}

fn transmits_h(h: &mut HubConn) -> Vec<Frame> {
    std::iter::from_fn(|| h.poll_transmit()).collect()
}

fn events(h: &mut HubConn) -> Vec<HubEvent> {
    std::iter::from_fn(|| h.poll_event()).collect()
}

fn hub_closed(events: &[HubEvent]) -> Option<&HubEnd> {
    events.iter().find_map(|e| match e {
        HubEvent::Closed { end } => Some(end),
        _ => None,
    })
}

fn site() -> Admission {
    Admission::Site { max_topic_len: 90 }
}

/// A hub connection welcomed with `resume`, its output drained.
fn open_hub(caps: Capabilities, agent_caps: Capabilities, resume: Resume, now: Instant) -> HubConn {
    let mut h = HubConn::new(now, hub_cfg(caps), site());
    h.handle_frame(hello(agent_caps, 7, 0), now);
    events(&mut h);
    h.welcome(now, 90, resume);
    transmits_h(&mut h);
    events(&mut h);
    h
}

#[test]
fn hub_wants_hello_first() {
    let now = Instant::now();
    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[1]),
        },
        now,
    );
    let (code, reason, _) = go_away_code(&transmits_h(&mut h)).expect("GoAway");
    assert_eq!(code, GoAwayCode::ProtocolError);
    assert_eq!(reason, "unexpected Batch frame while waiting for Hello");
    assert!(h.is_closed());
    // No Hello in time: closed, nothing to say on a stream that may not exist.
    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    assert_eq!(h.poll_timeout(), Some(now + Duration::from_secs(10)));
    h.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(hub_closed(&events(&mut h)), Some(&HubEnd::HelloTimeout));
    assert!(transmits_h(&mut h).is_empty());
}

#[test]
fn hub_refuses_unknown_sites_and_versions() {
    let now = Instant::now();
    let mut h = HubConn::new(
        now,
        hub_cfg(Capabilities::EMPTY),
        Admission::Unauthorized {
            reason: "site line9 is not configured on this hub".into(),
        },
    );
    h.handle_frame(hello(Capabilities::EMPTY, 1, 0), now);
    assert_eq!(
        go_away_code(&transmits_h(&mut h)),
        Some((
            GoAwayCode::Unauthorized,
            "site line9 is not configured on this hub".into(),
            None
        ))
    );
    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    h.handle_frame(
        Frame::Hello {
            versions: VersionRange { min: 1, max: 1 },
            capabilities: Capabilities::EMPTY,
            agent_name: "line1".into(),
            incarnation: 1,
            last_acked: 0,
            config_version: 0,
            lane: 0,
            agent_version: String::new(),
            window: 0,
        },
        now,
    );
    let (code, reason, _) = go_away_code(&transmits_h(&mut h)).expect("GoAway");
    assert_eq!(code, GoAwayCode::IncompatibleVersion);
    assert_eq!(
        reason,
        "no common protocol version: agent speaks 1..=1, hub speaks 2..=3"
    );
    assert!(matches!(
        hub_closed(&events(&mut h)),
        Some(HubEnd::Refused {
            code: GoAwayCode::IncompatibleVersion,
            ..
        })
    ));
}

#[test]
fn hub_refuses_a_lane_above_the_highest_priority_and_reports_the_others() {
    let now = Instant::now();
    let with_lane = |lane| {
        let mut frame = hello(Capabilities::EMPTY, 1, 0);
        if let Frame::Hello { lane: l, .. } = &mut frame {
            *l = lane;
        }
        frame
    };
    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    h.handle_frame(with_lane(10), now);
    let (code, reason, _) = go_away_code(&transmits_h(&mut h)).expect("GoAway");
    assert_eq!(code, GoAwayCode::ProtocolError);
    assert_eq!(reason, "lane 10 is above the highest priority, 9");

    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    h.handle_frame(with_lane(9), now);
    assert!(
        matches!(
            events(&mut h).first(),
            Some(HubEvent::Hello { lane: 9, .. })
        ),
        "lane 9 is admitted and reported to the shell"
    );
}

#[test]
fn hub_unavailable_carries_retry_after_only_to_agents_that_read_it() {
    let now = Instant::now();
    for (caps, want) in [
        (Capabilities::RETRY_AFTER, Some(1000)),
        (Capabilities::EMPTY, None),
    ] {
        let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
        h.handle_frame(hello(caps, 1, 0), now);
        assert!(matches!(events(&mut h)[..], [HubEvent::Hello { .. }]));
        h.refuse(
            GoAwayCode::Unavailable,
            "broker down".into(),
            Some(Duration::from_secs(1)),
        );
        let frames = transmits_h(&mut h);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            go_away_code(&frames),
            Some((GoAwayCode::Unavailable, "broker down".into(), want))
        );
        assert!(h.is_closed());
    }
}

#[test]
fn hub_welcome_applies_the_incarnation_rule() {
    let now = Instant::now();
    for (committed, want_hw, new_incarnation) in [
        (Some((7, 40)), 40, false),
        (Some((6, 40)), 0, true),
        (None, 0, false),
    ] {
        let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
        h.handle_frame(hello(Capabilities::RETRY_AFTER, 7, 0), now);
        events(&mut h);
        let hw = h.welcome(
            now,
            90,
            Resume {
                committed,
                ..Resume::default()
            },
        );
        assert_eq!(hw, want_hw);
        assert_eq!(
            transmits_h(&mut h),
            [Frame::Welcome {
                version: PROTOCOL_VERSION,
                capabilities: Capabilities::EMPTY,
                max_frame_size: 4096,
                hub_high_water: want_hw,
                config_version: 0,
                max_message_size: 1024,
                max_topic_len: 90,
                hub_version: "9.9.9".into(),
            }]
        );
        assert_eq!(
            events(&mut h).iter().any(|e| matches!(
                e,
                HubEvent::NewIncarnation {
                    old_incarnation: 6,
                    old_high_water: 40,
                    incarnation: 7
                }
            )),
            new_incarnation
        );
    }
}

#[test]
fn hub_holds_acks_back_while_less_than_half_the_agents_window_waits() {
    let now = Instant::now();
    let delay = Duration::from_millis(5);
    let mut h = HubConn::new(now, hub_cfg(Capabilities::EMPTY), site());
    let mut hello = hello(Capabilities::EMPTY, 7, 0);
    if let Frame::Hello { window, .. } = &mut hello {
        *window = 8;
    }
    h.handle_frame(hello, now);
    events(&mut h);
    h.welcome(now, 90, Resume::default());
    transmits_h(&mut h);
    events(&mut h);
    let send = |h: &mut HubConn, seq: u64| {
        h.handle_frame(
            Frame::Batch {
                entries: batch(&[seq]),
            },
            now,
        );
    };
    // Three batches committed one by one: fewer than 4 (half of 8) wait, so the Ack is held, due 5 ms
    // after the first commit.
    for seq in 1..=3 {
        send(&mut h, seq);
        h.committed(seq, vec![], now + Duration::from_millis(seq));
        assert!(transmits_h(&mut h).is_empty(), "Ack {seq} held");
    }
    assert!(h.ack_held());
    assert_eq!(
        h.poll_timeout(),
        Some(now + Duration::from_millis(1) + delay)
    );
    // The fourth makes half the window: one Ack for all four, at once.
    send(&mut h, 4);
    h.committed(4, vec![], now + Duration::from_millis(4));
    assert_eq!(transmits_h(&mut h), [Frame::Ack { upto: 4 }]);
    assert!(!h.ack_held() && h.poll_timeout().is_none());
    // A lone batch: acknowledged when its delay is over, not before; refusals are not held.
    send(&mut h, 5);
    let refusal = Refusal {
        seq: 5,
        reason_code: 0x90,
        detail: "topic".into(),
    };
    h.committed(5, vec![refusal], now);
    assert!(matches!(
        transmits_h(&mut h)[..],
        [Frame::Refused { seq: 5, .. }]
    ));
    h.handle_timeout(now + delay - Duration::from_millis(1));
    assert!(transmits_h(&mut h).is_empty());
    h.handle_timeout(now + delay);
    assert_eq!(transmits_h(&mut h), [Frame::Ack { upto: 5 }]);
    // A batch received but not committed counts as waiting too: with three uncommitted behind it, the
    // first commit is acknowledged at once.
    for seq in 6..=9 {
        send(&mut h, seq);
    }
    h.committed(6, vec![], now);
    assert_eq!(transmits_h(&mut h), [Frame::Ack { upto: 6 }]);
    // Ending the connection sends the held Ack before the GoAway.
    h.committed(7, vec![], now);
    assert!(transmits_h(&mut h).is_empty());
    h.close(GoAwayCode::ShuttingDown, "bye".into());
    let out = transmits_h(&mut h);
    assert_eq!(out[0], Frame::Ack { upto: 7 });
    assert!(matches!(out[1], Frame::GoAway { .. }));
}

#[test]
fn hub_acks_only_what_was_committed_with_refusals_first() {
    let now = Instant::now();
    let resume = Resume {
        committed: Some((7, 2)),
        ..Resume::default()
    };
    let mut h = open_hub(Capabilities::EMPTY, Capabilities::EMPTY, resume, now);
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[3, 4, 5]),
        },
        now,
    );
    h.handle_frame(Frame::Batch { entries: vec![] }, now);
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[7]),
        },
        now,
    );
    assert_eq!(
        events(&mut h),
        [
            HubEvent::PublishBatch {
                entries: batch(&[3, 4, 5])
            },
            HubEvent::PublishBatch {
                entries: batch(&[7])
            }
        ]
    );
    assert!(
        transmits_h(&mut h).is_empty(),
        "nothing acknowledged before the commit"
    );
    assert_eq!(h.uncommitted_batches(), 2);
    let refusal = |seq| Refusal {
        seq,
        reason_code: 0x90,
        detail: "topic".into(),
    };
    h.committed(5, vec![refusal(5), refusal(4)], now);
    assert_eq!(
        transmits_h(&mut h),
        [
            Frame::Refused {
                seq: 4,
                reason_code: 0x90,
                detail: "topic".into()
            },
            Frame::Refused {
                seq: 5,
                reason_code: 0x90,
                detail: "topic".into()
            },
            Frame::Ack { upto: 5 }
        ]
    );
    // Out of range or repeated: ignored.
    h.committed(5, vec![], now);
    h.committed(9, vec![], now);
    assert!(transmits_h(&mut h).is_empty());
    h.committed(7, vec![], now);
    assert_eq!(transmits_h(&mut h), [Frame::Ack { upto: 7 }]);
    assert_eq!(h.uncommitted_batches(), 0);
}

#[test]
fn hub_acks_replays_and_refuses_disordered_batches() {
    let now = Instant::now();
    let resume = Resume {
        committed: Some((7, 2)),
        ..Resume::default()
    };
    // A replay (after a lost Ack, or below the mark) is published again for the shell's dedup window to
    // drop, and acknowledged again.
    let mut h = open_hub(
        Capabilities::EMPTY,
        Capabilities::EMPTY,
        resume.clone(),
        now,
    );
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[3, 4]),
        },
        now,
    );
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[1, 2, 3, 4]),
        },
        now,
    );
    assert_eq!(events(&mut h).len(), 2);
    assert_eq!(h.uncommitted_batches(), 2);
    h.committed(4, vec![], now);
    h.committed(4, vec![], now);
    assert_eq!(
        transmits_h(&mut h),
        [Frame::Ack { upto: 4 }, Frame::Ack { upto: 4 }]
    );
    // Seqs out of order within one batch.
    let mut h = open_hub(Capabilities::EMPTY, Capabilities::EMPTY, resume, now);
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[5, 4]),
        },
        now,
    );
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::Protocol(ProtocolViolation::SeqNotIncreasing {
            seq: 4,
            after: 5
        }))
    );
    assert_eq!(
        go_away_code(&transmits_h(&mut h)).map(|g| g.0),
        Some(GoAwayCode::ProtocolError)
    );
}

#[test]
fn hub_streaming_frames() {
    let now = Instant::now();
    let mut h = open_hub(
        Capabilities::EMPTY,
        Capabilities::EMPTY,
        Resume::default(),
        now,
    );
    h.handle_frame(Frame::Ping { nonce: 3 }, now);
    assert_eq!(transmits_h(&mut h), [Frame::Pong { nonce: 3 }]);
    h.handle_frame(Frame::Pong { nonce: 1 }, now);
    assert!(events(&mut h).is_empty());
    h.handle_frame(Frame::Ack { upto: 1 }, now);
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::Protocol(ProtocolViolation::Unexpected {
            frame: FrameType::Ack,
            state: "streaming"
        }))
    );
    let mut h = open_hub(
        Capabilities::EMPTY,
        Capabilities::EMPTY,
        Resume::default(),
        now,
    );
    h.handle_frame(
        Frame::GoAway {
            code: GoAwayCode::Normal,
            reason: "bye".into(),
            retry_after_ms: None,
        },
        now,
    );
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::PeerGoAway {
            code: GoAwayCode::Normal,
            reason: "bye".into()
        })
    );
    assert!(transmits_h(&mut h).is_empty());
}

#[test]
fn hub_drains_before_goaway_and_closes_at_once_when_told() {
    let now = Instant::now();
    let mut h = open_hub(
        Capabilities::EMPTY,
        Capabilities::EMPTY,
        Resume::default(),
        now,
    );
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[1, 2]),
        },
        now,
    );
    events(&mut h);
    h.drain(GoAwayCode::Replaced, "another connection took over".into());
    assert!(h.is_draining());
    assert!(transmits_h(&mut h).is_empty());
    // What still arrives is left for the next connection.
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[3]),
        },
        now,
    );
    assert!(events(&mut h).is_empty());
    h.committed(2, vec![], now);
    assert_eq!(
        transmits_h(&mut h),
        [
            Frame::Ack { upto: 2 },
            Frame::GoAway {
                code: GoAwayCode::Replaced,
                reason: "another connection took over".into(),
                retry_after_ms: None
            }
        ]
    );
    assert!(h.is_closed());

    let mut h = open_hub(
        Capabilities::EMPTY,
        Capabilities::EMPTY,
        Resume::default(),
        now,
    );
    h.handle_frame(
        Frame::Batch {
            entries: batch(&[1]),
        },
        now,
    );
    h.close(GoAwayCode::Overloaded, "cloud broker".into());
    h.committed(1, vec![], now);
    assert_eq!(
        transmits_h(&mut h),
        [Frame::GoAway {
            code: GoAwayCode::Overloaded,
            reason: "cloud broker".into(),
            retry_after_ms: None
        }],
        "no Ack after the close"
    );
}

#[test]
fn hub_pushes_config_when_the_agent_runs_another_version() {
    let now = Instant::now();
    let both = Capabilities::CONFIG_PUSH;
    let offer = |version: u64| ConfigOffer {
        version,
        body: format!("v{version}"),
    };
    let welcomed = |agent_version: u64, rejected: Option<u64>, agent_caps: Capabilities| {
        let mut h = HubConn::new(now, hub_cfg(both), site());
        h.handle_frame(hello(agent_caps, 7, agent_version), now);
        events(&mut h);
        h.welcome(
            now,
            90,
            Resume {
                config: Some(offer(3)),
                config_rejected: rejected,
                ..Resume::default()
            },
        );
        let frames = transmits_h(&mut h);
        (h, frames)
    };
    let (_, frames) = welcomed(2, None, both);
    assert!(
        matches!(&frames[0], Frame::Welcome { config_version: 3, capabilities, .. } if *capabilities == both)
    );
    assert_eq!(
        frames[1],
        Frame::ConfigPush {
            version: 3,
            body: "v3".into()
        }
    );
    // Runs it already, refused it before, or cannot take pushes: no push.
    assert_eq!(welcomed(3, None, both).1.len(), 1);
    assert_eq!(welcomed(2, Some(3), both).1.len(), 1);
    assert_eq!(welcomed(2, None, Capabilities::EMPTY).1.len(), 1);

    let (mut h, _) = welcomed(2, None, both);
    h.handle_frame(
        Frame::ConfigAck {
            version: 3,
            result: Err(ConfigRejection {
                reason: ConfigRejectReason::Invalid,
                detail: "bad".into(),
            }),
        },
        now,
    );
    assert!(matches!(
        events(&mut h)[..],
        [HubEvent::ConfigRejected { version: 3, .. }]
    ));
    // The same version again is not pushed; a new one is, and its ack is reported.
    h.push_config(offer(3));
    assert!(transmits_h(&mut h).is_empty());
    h.push_config(offer(4));
    assert_eq!(
        transmits_h(&mut h),
        [Frame::ConfigPush {
            version: 4,
            body: "v4".into()
        }]
    );
    h.handle_frame(
        Frame::ConfigAck {
            version: 4,
            result: Ok(()),
        },
        now,
    );
    assert_eq!(events(&mut h), [HubEvent::ConfigApplied { version: 4 }]);
    // An answer to a version never pushed here.
    h.handle_frame(
        Frame::ConfigAck {
            version: 9,
            result: Ok(()),
        },
        now,
    );
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::Protocol(ProtocolViolation::ConfigAckUnknown {
            version: 9
        }))
    );
}

#[test]
fn hub_downlink_window_and_acks() {
    let now = Instant::now();
    let resume = Resume {
        downlink_acked: 4,
        downlink_written: 9,
        ..Resume::default()
    };
    // Not negotiated: nothing to send, and a DownlinkAck is unexpected.
    let mut h = open_hub(
        Capabilities::DOWNLINK,
        Capabilities::EMPTY,
        resume.clone(),
        now,
    );
    assert_eq!(h.next_downlink_send(), None);
    h.handle_frame(Frame::DownlinkAck { upto: 1 }, now);
    assert!(matches!(
        hub_closed(&events(&mut h)),
        Some(HubEnd::Protocol(ProtocolViolation::Unexpected {
            frame: FrameType::DownlinkAck,
            ..
        }))
    ));

    let mut h = open_hub(Capabilities::DOWNLINK, Capabilities::DOWNLINK, resume, now);
    assert_eq!(h.next_downlink_send(), Some(5));
    h.downlink_sent(now, 6, [6]);
    h.downlink_sent(now, 8, [8]);
    assert_eq!(h.next_downlink_send(), None, "window of 2 full");
    h.handle_frame(Frame::DownlinkAck { upto: 6 }, now);
    assert_eq!(events(&mut h), [HubEvent::DownlinkAcked { upto: 6 }]);
    assert_eq!(h.next_downlink_send(), Some(9));
    h.handle_frame(Frame::DownlinkAck { upto: 9 }, now);
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::Protocol(
            ProtocolViolation::DownlinkAckBeyondSent { upto: 9, sent: 8 }
        ))
    );
}

#[test]
fn agent_watchdog_ends_a_connection_whose_batches_get_no_ack() {
    let t = Duration::from_secs(30);
    let start = Instant::now();
    let mut a = AgentLink::new(
        AgentConfig {
            ack_timeout: Some(t),
            ..agent_cfg(Capabilities::EMPTY)
        },
        3,
    );
    let c = a.connect(start, marks(0, 10));
    a.handle_frame(c, welcome(0, Capabilities::EMPTY), start);
    transmits_a(&mut a);
    actions(&mut a);
    // Idle for long: nothing in flight, nothing to watch.
    assert_eq!(a.poll_timeout(), None);
    let later = start + Duration::from_secs(600);
    a.handle_timeout(later);
    assert_eq!(closed_with(&actions(&mut a)), None);
    // A batch sent after the idle time is watched from its send, not from the last ack.
    a.batches_sent(later, 3, [3]);
    assert_eq!(a.poll_timeout(), Some(later + t));
    a.handle_timeout(later + t - Duration::from_millis(1));
    assert_eq!(closed_with(&actions(&mut a)), None);
    // An ack of it restarts the clock for the next one.
    a.batches_sent(later + Duration::from_secs(1), 6, [6]);
    a.handle_frame(c, Frame::Ack { upto: 3 }, later + Duration::from_secs(20));
    actions(&mut a);
    a.handle_timeout(later + t + Duration::from_secs(1));
    assert_eq!(closed_with(&actions(&mut a)), None, "the ack was progress");
    let stuck = later + Duration::from_secs(20) + t;
    assert_eq!(a.poll_timeout(), Some(stuck));
    a.handle_timeout(stuck);
    assert_eq!(
        closed_with(&actions(&mut a)),
        Some(&AgentEnd::Stalled {
            after: t,
            unacked_batches: 1
        })
    );
}

#[test]
fn hub_watchdog_closes_a_connection_whose_downlink_gets_no_ack() {
    let t = Duration::from_secs(30);
    let start = Instant::now();
    let mut h = HubConn::new(
        start,
        HubConfig {
            downlink_ack_timeout: Some(t),
            ..hub_cfg(Capabilities::DOWNLINK)
        },
        site(),
    );
    h.handle_frame(hello(Capabilities::DOWNLINK, 7, 0), start);
    events(&mut h);
    h.welcome(
        start,
        90,
        Resume {
            downlink_acked: 0,
            downlink_written: 9,
            ..Resume::default()
        },
    );
    transmits_h(&mut h);
    events(&mut h);
    assert_eq!(
        h.poll_timeout(),
        None,
        "nothing in flight, nothing to watch"
    );
    // Sent after an idle minute: watched from the send.
    let later = start + Duration::from_secs(60);
    h.downlink_sent(later, 3, [3]);
    assert_eq!(h.poll_timeout(), Some(later + t));
    h.handle_timeout(later + t - Duration::from_millis(1));
    assert!(h.is_open());
    h.downlink_sent(later + Duration::from_secs(1), 6, [6]);
    h.handle_frame(
        Frame::DownlinkAck { upto: 3 },
        later + Duration::from_secs(10),
    );
    events(&mut h);
    h.handle_timeout(later + t);
    assert!(h.is_open(), "the ack was progress");
    h.handle_timeout(later + Duration::from_secs(10) + t);
    assert_eq!(
        hub_closed(&events(&mut h)),
        Some(&HubEnd::Stalled {
            after: t,
            unacked_frames: 1
        })
    );
    assert!(
        matches!(
            transmits_h(&mut h)[..],
            [Frame::GoAway {
                code: GoAwayCode::Normal,
                ..
            }]
        ),
        "the agent is told why"
    );
}

/// An agent and a hub one protocol version apart (issue 13 item 6): either side capped at the previous
/// version, as the previous release speaks it, agrees with the other on that version; the hub's software
/// version travels only from version 3 on. The frames cross the real codec in both directions.
#[test]
fn agent_and_hub_one_version_apart_agree_on_the_older() {
    let previous = VersionRange::supported_up_to(PROTOCOL_VERSION - 1);
    for (agent_versions, hub_versions, want, want_hub_version) in [
        (SUPPORTED, SUPPORTED, PROTOCOL_VERSION, "9.9.9"),
        (previous, SUPPORTED, PROTOCOL_VERSION - 1, ""),
        (SUPPORTED, previous, PROTOCOL_VERSION - 1, ""),
    ] {
        let now = Instant::now();
        let mut a = AgentLink::new(
            AgentConfig {
                versions: agent_versions,
                ..agent_cfg(Capabilities::EMPTY)
            },
            5,
        );
        let mut h = HubConn::new(
            now,
            HubConfig {
                versions: hub_versions,
                ..hub_cfg(Capabilities::EMPTY)
            },
            site(),
        );
        let c = a.connect(now, marks(0, 0));
        let through_codec = |frame: Frame| {
            let mut buf = bytes::BytesMut::new();
            frame.encode(&mut buf).expect("encodes");
            crate::wire::decode(&mut buf, 1 << 20)
                .expect("decodes")
                .expect("whole")
        };
        for frame in transmits_a(&mut a) {
            h.handle_frame(through_codec(frame), now);
        }
        events(&mut h);
        h.welcome(now, 90, Resume::default());
        for frame in transmits_h(&mut h) {
            a.handle_frame(c, through_codec(frame), now);
        }
        let welcomed = actions(&mut a).into_iter().find_map(|action| match action {
            AgentAction::Welcomed {
                version,
                hub_version,
                ..
            } => Some((version, hub_version)),
            _ => None,
        });
        assert_eq!(
            welcomed,
            Some((want, want_hub_version.to_owned())),
            "agent {agent_versions}, hub {hub_versions}"
        );
    }
}
