//! W3C trace context (`traceparent`) and the OpenTelemetry sampling rules, with no I/O: what both programs
//! decide about a message's trace before anything is exported.
//!
//! The envelope carries a message's `traceparent` as text (see `envelope.rs`); the agent parses it once,
//! when it decides whether to trace the message, and the hub once more, when it adds its own spans. The
//! exporter itself lives in `metrics/src/otel.rs`.
//!
//! # Sampling
//! The standard variables are honoured: `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`, `traceidratio`,
//! `parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio`) and
//! `OTEL_TRACES_SAMPLER_ARG` (the ratio). With neither set the sampler is `parentbased_traceidratio` at
//! [`DEFAULT_RATIO`], not the specification's `parentbased_always_on`: a factory line publishes thousands of
//! messages a second, and tracing each one would cost more than moving it (README, "Traces"). A
//! publisher that sends a sampled `traceparent` is still traced every time (parent-based).

use std::fmt;

/// The ratio of messages the agent starts a trace for when neither sampling variable is set.
pub const DEFAULT_RATIO: f64 = 0.01;

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// A parsed `traceparent` header: `00-<trace id>-<parent id>-<flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace this message belongs to.
    pub trace_id: [u8; 16],
    /// The span the next hop is a child of.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceParent {
    /// A sampled context for span `span_id` of trace `trace_id`.
    #[must_use]
    pub const fn sampled_span(trace_id: [u8; 16], span_id: [u8; 8]) -> Self {
        Self {
            trace_id,
            span_id,
            flags: SAMPLED,
        }
    }

    /// Parses a header value as the W3C Trace Context recommendation says: version `00` is exactly
    /// 55 characters; a later version (not `ff`) may carry more after a `-`; hex is lower case; all-zero
    /// trace and parent ids are invalid. `None` for anything else (the message is then treated as having no
    /// parent, as the recommendation asks).
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(b[0], b[1])?;
        match version {
            0x00 if b.len() != 55 => return None,
            0xff => return None,
            _ if b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(b[3 + 2 * i], b[4 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(b[36 + 2 * i], b[37 + 2 * i])?;
        }
        let flags = hex_byte(b[53], b[54])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Whether the upstream sampled this trace.
    #[must_use]
    pub const fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The same trace and flags with `span_id` as the parent of the next hop.
    #[must_use]
    pub const fn with_span(self, span_id: [u8; 8]) -> Self {
        Self { span_id, ..self }
    }

    /// The header value (version `00`).
    #[must_use]
    pub fn header(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.span_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

/// One lower-case hex digit pair.
fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    const fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(hi)? << 4 | digit(lo)?)
}

/// How traces are started for messages without a parent (the root sampler).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A fraction of traces, decided from the trace id so every hop decides alike.
    Ratio(f64),
}

impl Root {
    /// The decision for `trace_id`. The ratio test is the specification's `TraceIdRatioBased`, as the
    /// OpenTelemetry SDKs implement it: the id's low 64 bits, halved, against `ratio × 2^63`.
    #[must_use]
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        match *self {
            Self::AlwaysOn => true,
            Self::AlwaysOff => false,
            Self::Ratio(ratio) => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let x = u64::from_be_bytes(low) >> 1;
                // The product is in [0, 2^63]; the cast saturates at the top.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let bound = (ratio * (1u64 << 63) as f64) as u64;
                x < bound
            }
        }
    }
}

/// The sampler in force: a root rule, optionally deferring to a parent's decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// For messages without a (valid) parent, or for every message when not parent-based.
    pub root: Root,
    /// Whether a parent's `sampled` flag decides for its children.
    pub parent_based: bool,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            root: Root::Ratio(DEFAULT_RATIO),
            parent_based: true,
        }
    }
}

/// An `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` pair the programs refuse (at start-up: a typo must not
/// silently trace everything or nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    /// A sampler name this build does not implement.
    #[error("OTEL_TRACES_SAMPLER={0:?} is not supported (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)")]
    Unknown(String),
    /// A ratio that is not a number in [0, 1].
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?} is not a ratio between 0 and 1")]
    Ratio(String),
}

impl Sampler {
    /// The sampler the two variables name (each `None` when unset or empty).
    ///
    /// # Errors
    /// [`SamplerError`] for an unknown name or a ratio outside [0, 1].
    pub fn from_env(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let sampler = sampler.map(str::trim).filter(|s| !s.is_empty());
        let arg = arg.map(str::trim).filter(|s| !s.is_empty());
        let ratio = |default: f64| match arg {
            None => Ok(default),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| SamplerError::Ratio(a.to_owned())),
        };
        let (root, parent_based) = match sampler {
            None => (Root::Ratio(ratio(DEFAULT_RATIO)?), true),
            Some("always_on") => (Root::AlwaysOn, false),
            Some("always_off") => (Root::AlwaysOff, false),
            // The specification's default ratio when the name is given without one.
            Some("traceidratio") => (Root::Ratio(ratio(1.0)?), false),
            Some("parentbased_always_on") => (Root::AlwaysOn, true),
            Some("parentbased_always_off") => (Root::AlwaysOff, true),
            Some("parentbased_traceidratio") => (Root::Ratio(ratio(1.0)?), true),
            Some(other) => return Err(SamplerError::Unknown(other.to_owned())),
        };
        Ok(Self { root, parent_based })
    }

    /// Whether a message of trace `trace_id` with `parent` (a valid upstream context, if any) is sampled.
    #[must_use]
    pub fn samples(&self, parent: Option<&TraceParent>, trace_id: &[u8; 16]) -> bool {
        match parent {
            Some(p) if self.parent_based => p.is_sampled(),
            _ => self.root.samples(trace_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_recommendations_example_parses_and_prints_back() {
        let tp = TraceParent::parse(EXAMPLE).expect("valid");
        assert_eq!(tp.trace_id[0], 0x4b);
        assert_eq!(tp.span_id[7], 0xb7);
        assert!(tp.is_sampled());
        assert_eq!(tp.header(), EXAMPLE);
        let child = tp.with_span([1; 8]);
        assert_eq!(
            child.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0101010101010101-01"
        );
    }

    #[test]
    fn invalid_headers_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields after a dash.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceParent::parse(later).is_some());
    }

    #[test]
    fn sampler_variables() {
        assert_eq!(Sampler::from_env(None, None), Ok(Sampler::default()));
        assert_eq!(
            Sampler::from_env(Some("always_on"), None),
            Ok(Sampler {
                root: Root::AlwaysOn,
                parent_based: false
            })
        );
        assert_eq!(
            Sampler::from_env(Some("parentbased_traceidratio"), None),
            Ok(Sampler {
                root: Root::Ratio(1.0),
                parent_based: true
            })
        );
        assert_eq!(
            Sampler::from_env(None, Some("0.5")),
            Ok(Sampler {
                root: Root::Ratio(0.5),
                parent_based: true
            })
        );
        assert!(matches!(
            Sampler::from_env(Some("jaeger_remote"), None),
            Err(SamplerError::Unknown(_))
        ));
        assert!(matches!(
            Sampler::from_env(Some("traceidratio"), Some("1.5")),
            Err(SamplerError::Ratio(_))
        ));
        assert!(matches!(
            Sampler::from_env(None, Some("lots")),
            Err(SamplerError::Ratio(_))
        ));
    }

    #[test]
    fn parent_based_follows_the_parent() {
        let s = Sampler::from_env(Some("parentbased_always_off"), None).expect("valid");
        let mut parent = TraceParent::parse(EXAMPLE).expect("valid");
        assert!(s.samples(Some(&parent), &parent.trace_id));
        parent.flags = 0;
        let on = Sampler::from_env(Some("parentbased_always_on"), None).expect("valid");
        assert!(!on.samples(Some(&parent), &parent.trace_id));
        assert!(on.samples(None, &parent.trace_id));
        let plain_on = Sampler::from_env(Some("always_on"), None).expect("valid");
        assert!(plain_on.samples(Some(&parent), &parent.trace_id));
    }

    proptest! {
        #[test]
        fn any_context_round_trips(trace_id in any::<[u8; 16]>(), span_id in any::<[u8; 8]>(), flags in any::<u8>()) {
            prop_assume!(trace_id != [0; 16] && span_id != [0; 8]);
            let tp = TraceParent { trace_id, span_id, flags };
            prop_assert_eq!(TraceParent::parse(&tp.header()), Some(tp));
        }

        #[test]
        fn parse_is_total(s in ".{0,80}") {
            let _ = TraceParent::parse(&s);
        }

        #[test]
        fn a_ratio_samples_about_that_fraction(ids in proptest::collection::vec(any::<[u8; 16]>(), 2000), ratio in 0.05f64..0.95) {
            let root = Root::Ratio(ratio);
            let hits = ids.iter().filter(|id| root.samples(id)).count();
            #[allow(clippy::cast_precision_loss)]
            let fraction = hits as f64 / ids.len() as f64;
            prop_assert!((fraction - ratio).abs() < 0.06, "{} of 2000 at {}", hits, ratio);
            prop_assert!(Root::Ratio(1.0).samples(&ids[0]));
            prop_assert!(!Root::Ratio(0.0).samples(&ids[0]));
        }
    }
}
