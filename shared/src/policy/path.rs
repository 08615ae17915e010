//! The path a message has travelled, carried with it so that routes can never make it loop.
//!
//! # What travels with a message
//! A user property [`PATH_PROPERTY`] (`meshbridge-path`) whose value lists, in order, every *place* the
//! message has been published at, separated by commas: site names, and [`CLOUD`] (`$cloud`) for the cloud
//! broker. `line1,line2` is a message published at line1 and delivered by a site-to-site route to line2;
//! `line1,$cloud` one that line1 sent up; `$cloud,line2` a command delivered down to line2.
//!
//! The hub writes it on every message it publishes (into the cloud broker or, through an agent, into a site
//! broker), and MQTT 5 brokers keep user properties, so when a delivered message is captured again (line2's
//! agent forwards `from/line1/...` because a route matches it there too; the hub's own downlink
//! subscription sees what an uplink route just published) it comes back with its history. The routing engine
//! ([`crate::policy::route`]) then refuses every destination already on the path: a message never returns to
//! a place it has been, whatever the routes say, so A→B plus B→A routes cannot ping-pong and an uplink plus
//! a downlink over the same topics cannot echo.
//!
//! # Why this is safe to trust
//! The path only ever *removes* destinations. A publisher that forges or strips the property can at worst
//! stop its own message from reaching a place, or make it travel one more hop than it should: each hub hop
//! appends the place it delivers to, and a place already on the path is never a destination, so even a
//! stripped path is rebuilt from there and a chain ends after at most (sites + 1) hops. As a backstop, a
//! path longer than [`MAX_PATH_LEN`] places is refused outright.
//!
//! Site names are `[A-Za-z0-9._-]` (see [`crate::site`]), so a comma can never be part of one, and `$cloud`
//! can never be a site name.

use thiserror::Error;

use crate::site::SiteId;

/// The user property carrying the path.
pub const PATH_PROPERTY: &str = "meshbridge-path";

/// The place name of the cloud broker in a path; never a valid site name.
pub const CLOUD: &str = "$cloud";

/// Most places a path may hold. A message that would need more is not routed any further. A path holds
/// each place at most once when only hubs write it, so this only bounds forged or corrupted ones in meshes
/// of up to 15 sites; larger meshes with long site-to-site chains would need it raised.
pub const MAX_PATH_LEN: usize = 16;

/// Why a `meshbridge-path` property was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    /// The message carries more than one `meshbridge-path` property.
    #[error("the message carries {count} `meshbridge-path` properties")]
    Repeated {
        /// How many.
        count: usize,
    },
    /// An element is neither a site name nor `$cloud` (an empty element included).
    #[error("`meshbridge-path` element {index} ({place:?}) is not a site name or `$cloud`")]
    InvalidPlace {
        /// 0-based position.
        index: usize,
        /// The element.
        place: String,
    },
    /// The path is, or would become, longer than [`MAX_PATH_LEN`].
    #[error("`meshbridge-path` would hold {len} places, more than {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// [`MAX_PATH_LEN`].
        max: usize,
    },
}

/// The places a message has been published at, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct MeshPath(Vec<String>);

impl MeshPath {
    /// An empty path: a message fresh from a publisher.
    #[must_use]
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Parses a property value (`line1,$cloud`).
    ///
    /// # Errors
    /// [`PathError::InvalidPlace`] or [`PathError::TooLong`].
    pub fn parse(value: &str) -> Result<Self, PathError> {
        let mut places = Vec::new();
        for (index, place) in value.split(',').enumerate() {
            if index >= MAX_PATH_LEN {
                return Err(PathError::TooLong {
                    len: value.split(',').count(),
                    max: MAX_PATH_LEN,
                });
            }
            if place != CLOUD && SiteId::new(place).is_err() {
                return Err(PathError::InvalidPlace {
                    index,
                    place: place.to_owned(),
                });
            }
            places.push(place.to_owned());
        }
        Ok(Self(places))
    }

    /// The path carried in a message's user properties; empty when it has none.
    ///
    /// # Errors
    /// [`PathError::Repeated`] for several `meshbridge-path` properties, else those of [`parse`](Self::parse).
    pub fn from_properties(user: &[(String, String)]) -> Result<Self, PathError> {
        let mut values = user.iter().filter(|(k, _)| k == PATH_PROPERTY);
        match (values.next(), values.next()) {
            (None, _) => Ok(Self::new()),
            (Some((_, value)), None) => Self::parse(value),
            (Some(_), Some(_)) => Err(PathError::Repeated {
                count: 2 + values.count(),
            }),
        }
    }

    /// Whether the message has been at `place`.
    #[must_use]
    pub fn contains(&self, place: &str) -> bool {
        self.0.iter().any(|p| p == place)
    }

    /// Records that the message is now at `place`, unless that is already the last place (an agent
    /// recapturing what the hub delivered to its site).
    ///
    /// # Errors
    /// [`PathError::TooLong`] if the path would exceed [`MAX_PATH_LEN`]; the path is then unchanged.
    pub fn visit(&mut self, place: &str) -> Result<(), PathError> {
        if self.0.last().is_some_and(|last| last == place) {
            return Ok(());
        }
        if self.0.len() >= MAX_PATH_LEN {
            return Err(PathError::TooLong {
                len: self.0.len() + 1,
                max: MAX_PATH_LEN,
            });
        }
        self.0.push(place.to_owned());
        Ok(())
    }

    /// The path with `place` appended (see [`visit`](Self::visit)).
    ///
    /// # Errors
    /// As [`visit`](Self::visit).
    pub fn then(&self, place: &str) -> Result<Self, PathError> {
        let mut next = self.clone();
        next.visit(place)?;
        Ok(next)
    }

    /// The places, oldest first.
    #[must_use]
    pub fn places(&self) -> &[String] {
        &self.0
    }

    /// Number of places.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no place is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The property value (`line1,$cloud`).
    #[must_use]
    pub fn to_value(&self) -> String {
        self.0.join(",")
    }

    /// Sets the path on a message's user properties: replaces an existing `meshbridge-path` (every one, if
    /// there were several) or appends it; other properties keep their order.
    pub fn set_on(&self, user: &mut Vec<(String, String)>) {
        user.retain(|(k, _)| k != PATH_PROPERTY);
        user.push((PATH_PROPERTY.to_owned(), self.to_value()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parse_table() {
        let too_long = vec!["a"; MAX_PATH_LEN + 1].join(",");
        let max = vec!["a"; MAX_PATH_LEN].join(",");
        let cases: Vec<(&str, Result<usize, PathError>)> = vec![
            ("line1", Ok(1)),
            ("line1,$cloud,line2", Ok(3)),
            (&max, Ok(MAX_PATH_LEN)),
            (
                "",
                Err(PathError::InvalidPlace {
                    index: 0,
                    place: String::new(),
                }),
            ),
            (
                "line1,,line2",
                Err(PathError::InvalidPlace {
                    index: 1,
                    place: String::new(),
                }),
            ),
            (
                "line1,$SYS",
                Err(PathError::InvalidPlace {
                    index: 1,
                    place: "$SYS".into(),
                }),
            ),
            (
                "a/b",
                Err(PathError::InvalidPlace {
                    index: 0,
                    place: "a/b".into(),
                }),
            ),
            (
                &too_long,
                Err(PathError::TooLong {
                    len: MAX_PATH_LEN + 1,
                    max: MAX_PATH_LEN,
                }),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(
                MeshPath::parse(value).map(|p| p.len()),
                want,
                "value {value:?}"
            );
        }
    }

    #[test]
    fn properties_round_trip_and_replace() {
        let mut user = props(&[("a", "1"), (PATH_PROPERTY, "line1"), ("b", "2")]);
        let path = MeshPath::from_properties(&user).expect("valid");
        assert_eq!(path.places(), ["line1"]);
        let next = path.then(CLOUD).expect("short");
        next.set_on(&mut user);
        assert_eq!(
            user,
            props(&[("a", "1"), ("b", "2"), (PATH_PROPERTY, "line1,$cloud")])
        );
        assert_eq!(MeshPath::from_properties(&user), Ok(next));
        assert_eq!(MeshPath::from_properties(&[]), Ok(MeshPath::new()));
        let twice = props(&[(PATH_PROPERTY, "a"), (PATH_PROPERTY, "b")]);
        assert_eq!(
            MeshPath::from_properties(&twice),
            Err(PathError::Repeated { count: 2 })
        );
    }

    #[test]
    fn visit_is_idempotent_for_the_last_place_and_bounded() {
        let mut path = MeshPath::new();
        path.visit("line1").expect("room");
        path.visit("line1").expect("room");
        assert_eq!(path.places(), ["line1"]);
        for i in 1..MAX_PATH_LEN {
            path.visit(&format!("s{i}")).expect("room");
        }
        assert_eq!(path.len(), MAX_PATH_LEN);
        assert_eq!(
            path.visit("more"),
            Err(PathError::TooLong {
                len: MAX_PATH_LEN + 1,
                max: MAX_PATH_LEN
            })
        );
        assert_eq!(path.len(), MAX_PATH_LEN);
    }
}
