//! The edge broker's persistent sessions, on disk: what Mosquitto keeps with `persistence true` for a
//! client that connected with `cleansession=0` (MQTT 5: a Session Expiry Interval above 0).
//!
//! rumqttd keeps sessions in memory only, so the agent's front serves persistent sessions itself (see
//! `broker/src/sessions.rs`) and keeps them here: each session's subscriptions, and each QoS 1/2 message
//! routed to it that it has not acknowledged yet, written before the publisher's PUBACK is released.
//!
//! # On disk
//! - `sessions: client id -> record`: protocol level, expiry interval, when it went offline, and the
//!   subscriptions (filter, options byte). See [`SessionRecord`].
//! - `messages: (client id, seq) -> [protocol level][released][PUBLISH packet]`: the delivery, encoded
//!   for the session's protocol. `seq` is one counter for the whole store, so a session's messages are
//!   in routing order. The packet id on the wire is derived from `seq` (`broker/src/sessions.rs`), so a
//!   redelivery after a restart reuses the id the client may already have seen (a QoS 2 receiver
//!   recognises it); `released` records a PUBREC received, after which PUBREL is what is resent.
//!
//! # Durability
//! What a guarantee rests on is committed with `Durability::Immediate`: new messages ([`SessionStore::enqueue`]),
//! subscription changes, session removals and PUBREC marks (see [`SessionStore::release`]).
//! Acknowledgements are committed without an fsync (`Durability::None`, made durable by the next
//! immediate commit): losing one in a crash only redelivers a QoS 1 message the client had (allowed), or
//! resends the PUBREL of a completed QoS 2 exchange, which the client answers with PUBCOMP.
//!
//! # Bounds
//! Per session at most [`SessionLimits::max_messages`] messages and [`SessionLimits::max_bytes`] bytes
//! (Mosquitto's `max_queued_messages` / `max_queued_bytes`; 0 = no limit). A message that would exceed
//! them is not stored for that session; [`Enqueued::dropped`] names whom, so the caller counts and logs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::QueueError;

/// This file's schema version (`super::schema`).
const SCHEMA_VERSION: u64 = 1;
const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
const MESSAGES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("messages");

/// How much one session may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most queued messages per session; 0 = no limit.
    pub max_messages: u64,
    /// Most bytes of queued packets per session; 0 = no limit.
    pub max_bytes: u64,
}

impl Default for SessionLimits {
    /// 10,000 messages and 64 MiB per session: Mosquitto's default of 1,000 drops acknowledged QoS 1
    /// messages for a subscriber offline a few seconds at factory rates.
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// One persistent session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// MQTT protocol level of the client's last connection (4 = 3.1.1, 5 = 5.0).
    pub protocol_level: u8,
    /// Session expiry interval in seconds; `u32::MAX` never expires (3.1.1 `cleansession=0`).
    pub expiry_secs: u32,
    /// When the client went offline (ms since the Unix epoch); 0 while it is connected.
    pub offline_since_ms: u64,
    /// Subscriptions as (filter, options byte), in the order they were made.
    pub subscriptions: Vec<(String, u8)>,
}

impl SessionRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(self.protocol_level);
        out.put_u32(self.expiry_secs);
        out.put_u64(self.offline_since_ms);
        // Filters are at most 65,535 bytes (MQTT strings) and a session holds far fewer than 2^32.
        out.put_u32(u32::try_from(self.subscriptions.len()).unwrap_or(u32::MAX));
        for (filter, options) in &self.subscriptions {
            out.put_u16(u16::try_from(filter.len()).unwrap_or(u16::MAX));
            out.put_slice(filter.as_bytes());
            out.put_u8(*options);
        }
        out.to_vec()
    }

    fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = (b.get(..n)?, b.get(n..)?);
            *b = tail;
            Some(head)
        }
        let protocol_level = take(&mut b, 1)?[0];
        let expiry_secs = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
        let offline_since_ms = u64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
        let count = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
        let mut subscriptions = Vec::new();
        for _ in 0..count {
            let len = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
            let filter = std::str::from_utf8(take(&mut b, usize::from(len))?).ok()?;
            let options = take(&mut b, 1)?[0];
            subscriptions.push((filter.to_owned(), options));
        }
        b.is_empty().then_some(Self {
            protocol_level,
            expiry_secs,
            offline_since_ms,
            subscriptions,
        })
    }
}

/// One message queued for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// Its place in the store (routing order).
    pub seq: u64,
    /// The protocol level the packet is encoded for.
    pub protocol_level: u8,
    /// The client sent PUBREC for it (QoS 2): PUBREL is what remains to send.
    pub released: bool,
    /// The PUBLISH packet as delivered (packet id and DUP set at send time).
    pub packet: Bytes,
}

/// What [`SessionStore::enqueue`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// Messages stored, over all sessions.
    pub stored: u64,
    /// Sessions whose bound refused a message, with how many were refused.
    pub dropped: Vec<(String, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Depth {
    messages: u64,
    bytes: u64,
}

/// The store; see the module docs.
#[derive(Debug)]
pub struct SessionStore {
    path: PathBuf,
    db: Database,
    limits: SessionLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    depth: HashMap<String, Depth>,
}

const MESSAGE_HEADER: usize = 2;

impl SessionStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`QueueError::Storage`] or [`QueueError::DiskFull`].
    pub fn open(path: impl AsRef<Path>, limits: SessionLimits) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let err = |e: redb::Error| super::redb::storage_error(&path, e);
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let mut state = State {
            next_seq: 1,
            depth: HashMap::new(),
        };
        {
            let txn = db.begin_write().map_err(|e| err(e.into()))?;
            super::schema::check_queue_file(&txn, SCHEMA_VERSION, &path)?;
            txn.open_table(SESSIONS).map_err(|e| err(e.into()))?;
            txn.open_table(MESSAGES).map_err(|e| err(e.into()))?;
            txn.commit().map_err(|e| err(e.into()))?;
            let read = db.begin_read().map_err(|e| err(e.into()))?;
            let table = read.open_table(MESSAGES).map_err(|e| err(e.into()))?;
            for row in table.iter().map_err(|e| err(e.into()))? {
                let (key, value) = row.map_err(|e| err(e.into()))?;
                let (client, seq) = key.value();
                let depth = state.depth.entry(client.to_owned()).or_default();
                depth.messages += 1;
                depth.bytes += value.value().len().saturating_sub(MESSAGE_HEADER) as u64;
                state.next_seq = state.next_seq.max(seq + 1);
            }
        }
        Ok(Self {
            path,
            db,
            limits,
            state: Mutex::new(state),
        })
    }

    fn error(&self, e: impl Into<redb::Error>) -> QueueError {
        super::redb::storage_error(&self.path, e.into())
    }

    /// Every stored session.
    ///
    /// # Errors
    /// As any read; an unreadable record is a [`QueueError::Storage`] naming the client.
    pub fn sessions(&self) -> Result<Vec<(String, SessionRecord)>, QueueError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = read.open_table(SESSIONS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.error(e))? {
            let (client, value) = row.map_err(|e| self.error(e))?;
            let client = client.value().to_owned();
            let record = SessionRecord::decode(value.value()).ok_or_else(|| {
                self.error(redb::StorageError::Corrupted(format!(
                    "unreadable session record of client {client:?}"
                )))
            })?;
            out.push((client, record));
        }
        Ok(out)
    }

    /// Creates or replaces `client`'s record; `durable` commits with an fsync (subscription changes),
    /// otherwise without (the offline time).
    ///
    /// # Errors
    /// As any write; on error nothing changed.
    pub fn put(
        &self,
        client: &str,
        record: &SessionRecord,
        durable: bool,
    ) -> Result<(), QueueError> {
        let value = record.encode();
        self.write(durable, |txn| {
            txn.open_table(SESSIONS)?.insert(client, value.as_slice())?;
            Ok(())
        })
    }

    /// Removes `client`'s session and every message queued for it, durably. Returns how many messages
    /// were discarded.
    ///
    /// # Errors
    /// As any write; on error nothing changed.
    pub fn remove(&self, client: &str) -> Result<u64, QueueError> {
        self.write(true, |txn| {
            txn.open_table(SESSIONS)?.remove(client)?;
            let mut messages = txn.open_table(MESSAGES)?;
            messages.retain_in((client, 0)..=(client, u64::MAX), |_, _| false)?;
            Ok(())
        })?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(state.depth.remove(client).map_or(0, |d| d.messages))
    }

    /// Queues each (client, protocol level, packet) in order, in one durable commit, within each
    /// session's bound. Returns the store's seq of each stored message beside the outcome (`None`
    /// for a refused one).
    ///
    /// # Errors
    /// As any write; on error nothing was stored.
    pub fn enqueue(
        &self,
        batch: &[(&str, u8, Bytes)],
    ) -> Result<(Enqueued, Vec<Option<u64>>), QueueError> {
        if batch.is_empty() {
            return Ok((Enqueued::default(), Vec::new()));
        }
        // Held through the commit: seqs are given in commit order, and depths move only with commits.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut depth = state.depth.clone();
        let mut next = state.next_seq;
        let mut seqs = Vec::with_capacity(batch.len());
        let mut dropped: HashMap<&str, u64> = HashMap::new();
        for (client, _, packet) in batch {
            let d = depth.entry((*client).to_owned()).or_default();
            let len = packet.len() as u64;
            let over = (self.limits.max_messages > 0 && d.messages + 1 > self.limits.max_messages)
                || (self.limits.max_bytes > 0 && d.bytes + len > self.limits.max_bytes);
            if over {
                *dropped.entry(client).or_default() += 1;
                seqs.push(None);
            } else {
                d.messages += 1;
                d.bytes += len;
                seqs.push(Some(next));
                next += 1;
            }
        }
        let stored = seqs.iter().flatten().count() as u64;
        if stored > 0 {
            self.write(true, |txn| {
                let mut table = txn.open_table(MESSAGES)?;
                let mut value = Vec::new();
                for ((client, level, packet), seq) in batch.iter().zip(&seqs) {
                    let Some(seq) = seq else { continue };
                    value.clear();
                    value.extend_from_slice(&[*level, 0]);
                    value.extend_from_slice(packet);
                    table.insert((*client, *seq), value.as_slice())?;
                }
                Ok(())
            })?;
        }
        state.depth = depth;
        state.next_seq = next;
        let mut dropped: Vec<(String, u64)> = dropped
            .into_iter()
            .map(|(c, n)| (c.to_owned(), n))
            .collect();
        dropped.sort();
        Ok((Enqueued { stored, dropped }, seqs))
    }

    /// Up to `limit` of `client`'s queued messages with a seq above `after`, in order.
    ///
    /// # Errors
    /// As any read.
    pub fn pending(
        &self,
        client: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredDelivery>, QueueError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = read.open_table(MESSAGES).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        let Some(from) = after.checked_add(1) else {
            return Ok(out);
        };
        for row in table
            .range((client, from)..=(client, u64::MAX))
            .map_err(|e| self.error(e))?
        {
            if out.len() >= limit {
                break;
            }
            let (key, value) = row.map_err(|e| self.error(e))?;
            let value = value.value();
            if value.len() < MESSAGE_HEADER {
                continue;
            }
            out.push(StoredDelivery {
                seq: key.value().1,
                protocol_level: value[0],
                released: value[1] != 0,
                packet: Bytes::copy_from_slice(&value[MESSAGE_HEADER..]),
            });
        }
        Ok(out)
    }

    /// Marks `client`'s messages `seqs` as released (the client sent PUBREC), durably: only then may
    /// PUBREL go out. Were the mark lost in a crash after PUBREL, the message would be sent again as a
    /// PUBLISH, which a receiver that already completed the exchange takes for a new message.
    ///
    /// # Errors
    /// As any write.
    pub fn release(&self, client: &str, seqs: &[u64]) -> Result<(), QueueError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.write(true, |txn| {
            let mut table = txn.open_table(MESSAGES)?;
            for seq in seqs {
                let value = table.get((client, *seq))?.map(|v| v.value().to_vec());
                if let Some(mut value) = value {
                    if value.len() >= MESSAGE_HEADER {
                        value[1] = 1;
                        table.insert((client, *seq), value.as_slice())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Removes `client`'s acknowledged messages `seqs`, without an fsync (see the module docs).
    ///
    /// # Errors
    /// As any write.
    pub fn acknowledge(&self, client: &str, seqs: &[u64]) -> Result<(), QueueError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut freed = Depth::default();
        self.write(false, |txn| {
            let mut table = txn.open_table(MESSAGES)?;
            for seq in seqs {
                if let Some(old) = table.remove((client, *seq))? {
                    freed.messages += 1;
                    freed.bytes += old.value().len().saturating_sub(MESSAGE_HEADER) as u64;
                }
            }
            Ok(())
        })?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = state.depth.get_mut(client) {
            d.messages = d.messages.saturating_sub(freed.messages);
            d.bytes = d.bytes.saturating_sub(freed.bytes);
        }
        Ok(())
    }

    /// Messages and bytes queued for `client`.
    #[must_use]
    pub fn depth(&self, client: &str) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .depth
            .get(client)
            .map_or((0, 0), |d| (d.messages, d.bytes))
    }

    /// Messages and bytes queued over all sessions.
    #[must_use]
    pub fn totals(&self) -> (u64, u64) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .depth
            .values()
            .fold((0, 0), |(m, b), d| (m + d.messages, b + d.bytes))
    }

    /// The limits it was opened with.
    #[must_use]
    pub const fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// The seq the next stored message gets: every message stored so far has a lower one.
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_seq
    }

    fn write(
        &self,
        durable: bool,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), QueueError> {
        let run = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })?;
            body(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| super::redb::storage_error(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(subs: &[(&str, u8)]) -> SessionRecord {
        SessionRecord {
            protocol_level: 4,
            expiry_secs: u32::MAX,
            offline_since_ms: 0,
            subscriptions: subs.iter().map(|(f, o)| ((*f).to_owned(), *o)).collect(),
        }
    }

    fn packet(n: u8) -> Bytes {
        Bytes::from(vec![0x32, 5, 0, 1, b't', 0, n])
    }

    /// A store from before schema versions opens and is stamped; one a newer build stamped is refused.
    #[test]
    fn older_files_migrate_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.redb");
        {
            let store = SessionStore::open(&path, SessionLimits::default()).expect("open");
            super::super::schema::remove_version(&store.db).expect("as before versions");
        }
        {
            let store = SessionStore::open(&path, SessionLimits::default()).expect("migrates");
            assert_eq!(
                super::super::schema::version_of(&store.db).expect("read"),
                SCHEMA_VERSION
            );
            super::super::schema::force_version(&store.db, SCHEMA_VERSION + 1).expect("newer");
        }
        let err = SessionStore::open(&path, SessionLimits::default()).expect_err("refused");
        assert!(matches!(err, QueueError::Schema { .. }), "{err}");
    }

    #[test]
    fn sessions_and_messages_survive_reopen_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.redb");
        let store = SessionStore::open(&path, SessionLimits::default()).expect("open");
        store.put("a", &record(&[("t/#", 1)]), true).expect("put");
        store.put("b", &record(&[("t", 2)]), true).expect("put");
        let (outcome, seqs) = store
            .enqueue(&[
                ("a", 4, packet(1)),
                ("b", 4, packet(2)),
                ("a", 4, packet(3)),
            ])
            .expect("enqueue");
        assert_eq!(outcome.stored, 3);
        assert_eq!(seqs, [Some(1), Some(2), Some(3)]);
        store.release("b", &[2]).expect("release");
        store.acknowledge("a", &[1]).expect("ack");
        // An immediate commit makes the earlier non-durable ones durable too.
        store
            .put("a", &record(&[("t/#", 1), ("u", 0)]), true)
            .expect("put");
        drop(store);

        let store = SessionStore::open(&path, SessionLimits::default()).expect("reopen");
        let sessions = store.sessions().expect("sessions");
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions[0].1, record(&[("t/#", 1), ("u", 0)]));
        let a = store.pending("a", 0, 10).expect("pending");
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].seq, a[0].packet.clone()), (3, packet(3)));
        let b = store.pending("b", 0, 10).expect("pending");
        assert!(b[0].released, "the PUBREC mark survived");
        assert_eq!(store.depth("a"), (1, 7));
        let (_, seqs) = store.enqueue(&[("a", 4, packet(4))]).expect("enqueue");
        assert_eq!(seqs, [Some(4)], "seqs continue after the highest stored");
        assert_eq!(store.pending("a", 3, 10).expect("pending")[0].seq, 4);
    }

    #[test]
    fn bounds_refuse_new_messages_per_session_and_removal_discards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = SessionLimits {
            max_messages: 2,
            max_bytes: 0,
        };
        let store = SessionStore::open(dir.path().join("s.redb"), limits).expect("open");
        let (outcome, seqs) = store
            .enqueue(&[
                ("a", 4, packet(1)),
                ("a", 4, packet(2)),
                ("a", 4, packet(3)),
                ("b", 4, packet(4)),
            ])
            .expect("enqueue");
        assert_eq!(outcome.stored, 3);
        assert_eq!(outcome.dropped, [("a".to_owned(), 1)]);
        assert_eq!(seqs, [Some(1), Some(2), None, Some(3)]);
        store.acknowledge("a", &[1]).expect("ack");
        let (outcome, _) = store.enqueue(&[("a", 4, packet(5))]).expect("enqueue");
        assert_eq!(outcome.stored, 1, "an acknowledgement makes room");
        assert_eq!(store.remove("a").expect("remove"), 2);
        assert!(store.pending("a", 0, 10).expect("pending").is_empty());
        assert_eq!(store.totals(), (1, 7));

        let bytes = SessionStore::open(
            dir.path().join("b.redb"),
            SessionLimits {
                max_messages: 0,
                max_bytes: 10,
            },
        )
        .expect("open");
        let (outcome, _) = bytes
            .enqueue(&[("a", 4, packet(1)), ("a", 4, packet(2))])
            .expect("enqueue");
        assert_eq!(
            (outcome.stored, outcome.dropped.len()),
            (1, 1),
            "7 + 7 > 10 bytes"
        );
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = SessionRecord {
            protocol_level: 5,
            expiry_secs: 30,
            offline_since_ms: 1_700_000_000_000,
            subscriptions: vec![("a/+/c".to_owned(), 0b10_0101), ("#".to_owned(), 0)],
        };
        assert_eq!(SessionRecord::decode(&r.encode()), Some(r.clone()));
        let mut long = r.encode();
        long.push(0);
        assert_eq!(SessionRecord::decode(&long), None);
        assert_eq!(SessionRecord::decode(&r.encode()[..10]), None);
    }
}
