//! From what the publishers sent and what the subscriber received to the figures of a run, and from runs
//! to medians.

use std::collections::HashMap;

use crate::load::{Published, Receipt};

/// How a figure is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fmt {
    /// Whole number with thousands separators.
    Count,
    /// Milliseconds from nanoseconds, two decimals.
    Ms,
    /// Seconds, two decimals.
    Secs,
    /// Microseconds, one decimal.
    Micros,
    /// Mebibytes from bytes, one decimal.
    Mib,
}

/// One named figure of one run (`None`: does not apply to this system or could not be measured).
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// Label in the table.
    pub(crate) name: &'static str,
    /// The value in the unit `fmt` expects.
    pub(crate) value: Option<f64>,
    /// How to print it.
    pub(crate) fmt: Fmt,
}

/// Builds rows in order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Rows(pub Vec<Row>);

impl Rows {
    /// Appends a figure.
    pub(crate) fn push(&mut self, name: &'static str, value: Option<f64>, fmt: Fmt) {
        self.0.push(Row { name, value, fmt });
    }

    /// Value of a named row.
    pub(crate) fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|r| r.name == name).and_then(|r| r.value)
    }
}

/// What a run delivered, judged from the subscriber's side.
#[derive(Debug, Clone, Default)]
pub(crate) struct Delivery {
    /// Messages handed to the edge.
    pub(crate) sent: u64,
    /// Messages the edge acknowledged (PUBACK).
    pub(crate) acked: u64,
    /// Distinct messages received.
    pub(crate) delivered: u64,
    /// Receipts beyond the first of a message.
    pub(crate) duplicates: u64,
    /// Acknowledged messages never received: the loss that matters.
    pub(crate) lost_acked: u64,
    /// Sent, never acknowledged and never received (the edge died before it could answer).
    pub(crate) lost_unacked: u64,
    /// First receipts that arrived after a later message of the same publisher.
    pub(crate) reordered: u64,
    /// Distinct messages per second, first send to last receipt.
    pub(crate) rate: f64,
    /// Latency percentiles of first receipts, nanoseconds: p50, p99, p99.9, max.
    pub(crate) latency: [u64; 4],
    /// Receive time of each message's first receipt, `[publisher][seq]`, for drain computations.
    first_recv: Vec<Vec<Option<u64>>>,
    /// Send times `[publisher][seq]` of received messages.
    sent_at: Vec<Vec<Option<u64>>>,
}

impl Delivery {
    /// Judges a run.
    pub(crate) fn compute(published: &[Published], receipts: &[Receipt]) -> Self {
        let mut d = Self {
            sent: published.iter().map(|p| p.sent).sum(),
            acked: published
                .iter()
                .map(|p| p.acked.iter().filter(|&&a| a).count() as u64)
                .sum(),
            ..Self::default()
        };
        d.first_recv = published
            .iter()
            .map(|p| vec![None; usize::try_from(p.sent).unwrap_or(0)])
            .collect();
        d.sent_at = d.first_recv.clone();
        let mut highest: HashMap<u32, u64> = HashMap::new();
        let mut latencies = Vec::with_capacity(receipts.len());
        let (mut first_sent, mut last_recv) = (u64::MAX, 0u64);
        for r in receipts {
            let slot = d
                .first_recv
                .get_mut(r.publisher as usize)
                .and_then(|v| v.get_mut(usize::try_from(r.seq).unwrap_or(usize::MAX)));
            let Some(slot) = slot else {
                // A message this run did not send (left over from an earlier instance): ignore.
                continue;
            };
            if slot.is_some() {
                d.duplicates += 1;
                continue;
            }
            *slot = Some(r.recv_ns);
            d.sent_at[r.publisher as usize][r.seq as usize] = Some(r.sent_ns);
            d.delivered += 1;
            let high = highest.entry(r.publisher).or_insert(0);
            if r.seq < *high {
                d.reordered += 1;
            } else {
                *high = r.seq;
            }
            latencies.push(r.recv_ns.saturating_sub(r.sent_ns));
            first_sent = first_sent.min(r.sent_ns);
            last_recv = last_recv.max(r.recv_ns);
        }
        for (p, recv) in published.iter().zip(&d.first_recv) {
            for (seq, got) in recv.iter().enumerate() {
                if got.is_none() {
                    if p.acked.get(seq).copied().unwrap_or(false) {
                        d.lost_acked += 1;
                    } else {
                        d.lost_unacked += 1;
                    }
                }
            }
        }
        latencies.sort_unstable();
        let pick = |q: f64| -> u64 {
            if latencies.is_empty() {
                return 0;
            }
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[i]
        };
        d.latency = [pick(0.50), pick(0.99), pick(0.999), pick(1.0)];
        if last_recv > first_sent {
            d.rate = d.delivered as f64 / ((last_recv - first_sent) as f64 / 1e9);
        }
        d
    }

    /// Seconds from `t_ns` (the cloud side back) to the first message received after it.
    pub(crate) fn resume_after(&self, t_ns: u64) -> Option<f64> {
        self.first_recv
            .iter()
            .flatten()
            .flatten()
            .filter(|&&r| r >= t_ns)
            .min()
            .map(|&r| (r - t_ns) as f64 / 1e9)
    }

    /// Seconds from `t_ns` until every message sent before `t_ns` had been received (the backlog at that
    /// moment drained). Lost messages are not waited for; they are counted separately.
    pub(crate) fn drained_after(&self, t_ns: u64) -> Option<f64> {
        let mut last = None::<u64>;
        for (recv, sent) in self.first_recv.iter().zip(&self.sent_at) {
            for (r, s) in recv.iter().zip(sent) {
                if let (Some(r), Some(s)) = (r, s) {
                    if *s <= t_ns {
                        last = Some(last.map_or(*r, |l| l.max(*r)));
                    }
                }
            }
        }
        last.map(|l| l.saturating_sub(t_ns) as f64 / 1e9)
    }

    /// The common rows of a run.
    pub(crate) fn rows(&self, rows: &mut Rows) {
        let c = |v: u64| Some(v as f64);
        rows.push("delivered msg/s", Some(self.rate), Fmt::Count);
        rows.push("messages sent", c(self.sent), Fmt::Count);
        rows.push("acknowledged to publishers", c(self.acked), Fmt::Count);
        rows.push("delivered (distinct)", c(self.delivered), Fmt::Count);
        rows.push("lost after PUBACK", c(self.lost_acked), Fmt::Count);
        rows.push("lost, never acked", c(self.lost_unacked), Fmt::Count);
        rows.push("duplicates", c(self.duplicates), Fmt::Count);
        rows.push("reordered", c(self.reordered), Fmt::Count);
        let names = ["latency p50", "latency p99", "latency p99.9", "latency max"];
        for (name, v) in names.into_iter().zip(self.latency) {
            // Nothing delivered: there is no latency to speak of.
            rows.push(name, (self.delivered > 0).then_some(v as f64), Fmt::Ms);
        }
    }
}

impl Delivery {
    /// The rows of a second subscriber, at the edge (see the `LocalSession` scenario).
    pub(crate) fn local_rows(&self, rows: &mut Rows) {
        let c = |v: u64| Some(v as f64);
        rows.push("local delivered (distinct)", c(self.delivered), Fmt::Count);
        rows.push("local lost after PUBACK", c(self.lost_acked), Fmt::Count);
        rows.push("local duplicates", c(self.duplicates), Fmt::Count);
        let names = ["local latency p50", "local latency p99"];
        for (name, v) in names.into_iter().zip(self.latency) {
            rows.push(name, (self.delivered > 0).then_some(v as f64), Fmt::Ms);
        }
    }
}

/// Median of each row over runs (rows matched by name, in the first run's order).
pub(crate) fn median(runs: &[Rows]) -> Rows {
    let mut out = Rows::default();
    let Some(first) = runs.first() else {
        return out;
    };
    for row in &first.0 {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.get(row.name)).collect();
        values.sort_by(f64::total_cmp);
        let value = match values.len() {
            0 => None,
            n if n % 2 == 1 => Some(values[n / 2]),
            n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        };
        out.push(row.name, value, row.fmt);
    }
    out
}

/// Formats a value for the table.
pub(crate) fn format(value: Option<f64>, fmt: Fmt) -> String {
    let Some(v) = value else {
        return "n/a".to_owned();
    };
    match fmt {
        Fmt::Count => thousands(v.round() as i64),
        Fmt::Ms => format!("{:.2} ms", v / 1e6),
        Fmt::Secs => format!("{v:.2} s"),
        Fmt::Micros => format!("{v:.1} µs"),
        Fmt::Mib => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
    }
}

fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(publisher: u32, seq: u64, sent_ns: u64, recv_ns: u64) -> Receipt {
        Receipt {
            publisher,
            seq,
            sent_ns,
            recv_ns,
        }
    }

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let published = vec![Published {
            sent: 5,
            acked: vec![true, true, true, true, false],
        }];
        // seq 1 lost (acked), seq 4 lost (never acked), seq 2 twice, seq 0 after seq 2.
        let receipts = [
            receipt(0, 2, 0, 10),
            receipt(0, 0, 0, 20),
            receipt(0, 2, 0, 30),
            receipt(0, 3, 0, 40),
        ];
        let d = Delivery::compute(&published, &receipts);
        let got = (
            d.sent,
            d.acked,
            d.delivered,
            d.duplicates,
            d.lost_acked,
            d.lost_unacked,
            d.reordered,
        );
        assert_eq!(got, (5, 4, 3, 1, 1, 1, 1));
        assert_eq!(d.latency, [20, 40, 40, 40]);
    }

    #[test]
    fn drain_and_resume_after_a_return() {
        let published = vec![Published {
            sent: 3,
            acked: vec![true; 3],
        }];
        let receipts = [
            receipt(0, 0, 100, 150),
            receipt(0, 1, 200, 900),
            receipt(0, 2, 600, 950),
        ];
        let d = Delivery::compute(&published, &receipts);
        // Back at 500: first receipt after it at 900, everything sent before 500 (seq 0, 1) in by 900.
        assert_eq!(d.resume_after(500), Some(400e-9));
        assert_eq!(d.drained_after(500), Some(400e-9));
    }

    #[test]
    fn median_by_name_and_formatting() {
        let run = |v: f64| {
            let mut r = Rows::default();
            r.push("x", Some(v), Fmt::Count);
            r.push("y", None, Fmt::Ms);
            r
        };
        let m = median(&[run(3.0), run(1.0), run(2.0)]);
        assert_eq!(m.get("x"), Some(2.0));
        assert_eq!(m.get("y"), None);
        let cases = [
            (Some(1_234_567.0), Fmt::Count, "1,234,567"),
            (Some(2_500_000.0), Fmt::Ms, "2.50 ms"),
            (Some(3.0 * 1024.0 * 1024.0), Fmt::Mib, "3.0 MiB"),
            (None, Fmt::Secs, "n/a"),
        ];
        for (v, f, want) in cases {
            assert_eq!(format(v, f), want);
        }
    }
}
