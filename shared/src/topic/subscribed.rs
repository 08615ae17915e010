//! The filters a broker's subscribers hold, counted, for "could any subscriber receive this topic?".
//!
//! The embedded edge broker's front answers a QoS 0/1 PUBLISH itself, without handing it to rumqttd,
//! when no subscription of rumqttd's could match it (`broker/src/front.rs`, "Unsubscribed topics"): at a
//! factory line most topics go up to the hub and nobody reads them on the site, and the hand-off to
//! rumqttd cost a router wake-up and a socket round trip per message. The question must never be
//! answered "no" while a subscription that matches exists, so the set is a multiset: two connections may
//! hold the same filter, and one unsubscribing must not hide the other's.

use std::collections::HashMap;

use super::TopicFilter;

/// Prefix of an MQTT 5 shared subscription (`$share/{group}/{filter}`, 5.0 §4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// A multiset of subscription filters.
///
/// Filters without wildcards are found by a hash lookup of the topic; wildcard filters are scanned, which
/// is cheap for the handful a site's local dashboards hold.
#[derive(Debug, Default, Clone)]
pub struct SubscribedFilters {
    /// Filters without wildcards (each matches one topic), with how many subscriptions hold each.
    exact: HashMap<String, usize>,
    /// Filters with wildcards, with their counts.
    wildcard: Vec<(TopicFilter, usize)>,
    /// Filters that could not be parsed: counted, and while any is held every topic "matches", so a
    /// filter this module does not understand never hides a subscriber.
    unparsed: HashMap<String, usize>,
}

impl SubscribedFilters {
    /// An empty set: no topic matches.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// One more subscription holds `filter` (as written in a SUBSCRIBE; a shared subscription counts as
    /// its filter).
    pub fn add(&mut self, filter: &str) {
        let filter = unshared(filter);
        match TopicFilter::parse(filter) {
            Ok(parsed) if !parsed.has_wildcards() => {
                *self.exact.entry(parsed.into_string()).or_insert(0) += 1;
            }
            Ok(parsed) => match self.wildcard.iter_mut().find(|(f, _)| *f == parsed) {
                Some((_, count)) => *count += 1,
                None => self.wildcard.push((parsed, 1)),
            },
            Err(_) => *self.unparsed.entry(filter.to_owned()).or_insert(0) += 1,
        }
    }

    /// One subscription no longer holds `filter`. Removing a filter the set does not hold does nothing.
    pub fn remove(&mut self, filter: &str) {
        let filter = unshared(filter);
        fn take(map: &mut HashMap<String, usize>, key: &str) {
            if let Some(count) = map.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(key);
                }
            }
        }
        if let Some(at) = self.wildcard.iter().position(|(f, _)| f.as_str() == filter) {
            self.wildcard[at].1 -= 1;
            if self.wildcard[at].1 == 0 {
                self.wildcard.swap_remove(at);
            }
            return;
        }
        if self.exact.contains_key(filter) {
            take(&mut self.exact, filter);
        } else {
            take(&mut self.unparsed, filter);
        }
    }

    /// Whether any held filter matches `topic` (a valid topic name).
    #[must_use]
    pub fn matches(&self, topic: &str) -> bool {
        !self.unparsed.is_empty()
            || self.exact.contains_key(topic)
            || self.wildcard.iter().any(|(f, _)| f.matches_str(topic))
    }

    /// Whether no filter is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.unparsed.is_empty()
    }
}

/// The filter of a shared subscription (`$share/group/a/b` → `a/b`); any other filter as it is. A
/// `$share/group` without a filter stays whole, which does not parse and so matches everything.
fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix(SHARE_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn counts_per_filter_and_shared_subscriptions() {
        let mut s = SubscribedFilters::new();
        assert!(!s.matches("a/b") && s.is_empty());
        s.add("a/b");
        s.add("a/b");
        s.add("$share/g/x/+");
        assert!(s.matches("a/b") && s.matches("x/1") && !s.matches("x/1/2"));
        s.remove("a/b");
        assert!(s.matches("a/b"), "a second subscription still holds a/b");
        s.remove("a/b");
        assert!(!s.matches("a/b"));
        s.remove("a/b");
        s.remove("$share/g/x/+");
        assert!(s.is_empty());
    }

    #[test]
    fn dollar_topics_and_unparsed_filters() {
        let mut s = SubscribedFilters::new();
        s.add("#");
        assert!(s.matches("a") && !s.matches("$SYS/x"));
        s.add("");
        assert!(s.matches("$SYS/x"), "an unparsed filter matches everything");
        s.remove("");
        s.remove("#");
        assert!(s.is_empty());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just(String::new())
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..4)
            .prop_map(|l| l.join("/"))
            .prop_filter("a topic has at least one byte", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..4)
            .prop_flat_map(|levels| {
                (Just(levels), any::<bool>()).prop_map(|(mut l, hash)| {
                    if hash {
                        l.push("#".to_owned());
                    }
                    l.join("/")
                })
            })
            .prop_filter("a filter has at least one byte", |f| !f.is_empty())
    }

    proptest! {
        /// After any sequence of adds and removes, `matches` says what a plain list of the filters held
        /// (each add pushed, each remove taking one equal entry) says.
        #[test]
        fn agrees_with_a_list(ops in prop::collection::vec((any::<bool>(), filter()), 0..40), topics in prop::collection::vec(topic(), 1..10)) {
            let mut s = SubscribedFilters::new();
            let mut list: Vec<String> = Vec::new();
            for (add, f) in ops {
                if add {
                    s.add(&f);
                    list.push(f);
                } else {
                    s.remove(&f);
                    if let Some(at) = list.iter().position(|x| *x == f) {
                        list.remove(at);
                    }
                }
            }
            prop_assert_eq!(s.is_empty(), list.is_empty());
            for t in &topics {
                let expected = list.iter().any(|f| TopicFilter::parse(f).expect("valid").matches_str(t));
                prop_assert_eq!(s.matches(t), expected, "topic {}", t);
            }
        }
    }
}
