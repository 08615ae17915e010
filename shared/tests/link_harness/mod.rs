//! An in-memory world for the link machines (`shared::link`): one agent, the hub's connections for its
//! site, the network between them and a virtual clock. The shells are models: a queue of message ids numbered by seq, a cloud broker that publishes
//! (and refuses every message whose id is 3 mod 7), a local broker that takes downlink messages, a config
//! applier that refuses bodies containing "bad".
//!
//! Faults follow what one QUIC stream per connection allows: frames are reliable and in order while a
//! connection lives; a cut loses a suffix of what was in flight, and the prefix may still arrive late, to
//! the dead connection's ends only (raw duplicates included), after a new connection started. The hub and
//! the agent restart (losing what they did not persist), the agent's data directory can be restored from
//! an older snapshot, the cloud broker can be down (`Unavailable` with retry-after).
//!
//! Every step checks the safety properties; [`World::heal`] then runs without faults and
//! [`World::check_converged`] the liveness ones.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::envelope::{Envelope, Properties, QoS};
use shared::link::agent::{AgentAction, AgentConfig, AgentEnd, AgentLink, QueueMarks};
use shared::link::hub::{Admission, ConfigOffer, HubConfig, HubConn, HubEnd, HubEvent, Resume};
use shared::link::{ConnId, Keepalive, Refusal};
use shared::wire::{Capabilities, ConfigRejectReason, ConfigRejection, Frame, GoAwayCode};

/// Messages per batch the agent's shell reads.
const BATCH: usize = 3;
const RECONNECT: Duration = Duration::from_millis(200);

/// A fault or an event of the environment.
#[derive(Debug, Clone)]
pub enum Step {
    /// The agent's publishers deliver `n` messages into its queue.
    Append(u8),
    /// Messages for the site arrive in the hub's downlink queue.
    DownlinkAppend(u8),
    /// Time passes.
    Advance(u16),
    /// The one-way network delay becomes this many ms.
    Delay(u16),
    /// The connection is cut: of what is in flight, `keep` frames per direction survive to arrive late;
    /// the agent notices at once if `notify`, else through its keepalive.
    Cut { keep: u8, notify: bool },
    /// One frame from a dead connection arrives (`dup`: and is kept to arrive again).
    DeliverStale { pick: u8, dup: bool },
    /// The hub publishes and commits its oldest pending batch.
    HubCommit,
    /// The hub publishes its oldest pending batch but does not commit it yet.
    HubPublishOnly,
    /// The hub process restarts: connections and uncommitted batches are lost.
    HubRestart,
    /// The agent process restarts: its queue and last-good config survive.
    AgentRestart,
    /// The agent's data directory is snapshotted (for a later restore).
    Snapshot,
    /// The agent restarts on the last snapshot (restored data directory).
    Restore,
    /// The agent's shell finishes its pending work (config applies, downlink deliveries).
    AgentShell,
    /// The hub's operator publishes a new config version (`bad`: one the agent refuses).
    PushConfig { bad: bool },
    /// The cloud broker goes down or comes back.
    Broker(bool),
}

#[derive(Debug, Clone, Default)]
struct ModelQueue {
    incarnation: u64,
    acked: u64,
    next_seq: u64,
    /// seq -> message id.
    entries: BTreeMap<u64, u64>,
}

impl ModelQueue {
    fn marks(&self) -> QueueMarks {
        QueueMarks {
            incarnation: self.incarnation,
            acked: self.acked,
            written: self.next_seq - 1,
        }
    }

    /// `RedbQueue::restart_above`: a new incarnation, unacked entries renumbered from `floor + 1`.
    fn restart_above(&mut self, floor: u64, incarnation: u64) {
        let by = floor.saturating_sub(self.acked);
        self.entries = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(seq, id)| (seq + by, id))
            .collect();
        self.acked += by;
        self.next_seq += by;
        self.incarnation = incarnation;
    }
}

struct Link {
    id: ConnId,
    hub: HubConn,
    /// Incarnation the agent announced on it (once `Hello` arrived).
    incarnation: Option<u64>,
    to_hub: VecDeque<(Instant, Frame)>,
    to_agent: VecDeque<(Instant, Frame)>,
    /// Cut: frames are not carried any more, except stale ones on request.
    dead: bool,
    /// The agent ended it (its last frames still arrive, then the hub sees the close).
    closing_by_agent: bool,
    /// The hub ended it.
    closing_by_hub: bool,
    /// Frames of a dead connection that may still arrive.
    stale_to_hub: VecDeque<Frame>,
    stale_to_agent: VecDeque<Frame>,
}

struct Pending {
    link: usize,
    incarnation: u64,
    entries: Vec<Envelope>,
    published: bool,
}

/// The world.
pub struct World {
    base: Instant,
    now: Instant,
    delay: Duration,
    agent: AgentLink,
    queue: ModelQueue,
    snapshot: Option<ModelQueue>,
    next_msg: u64,
    next_incarnation: u64,
    /// Message ids lost because the data directory was restored from before they were written.
    lost: HashSet<u64>,
    /// Message ids in the agent's dead-letter store.
    dead_letters: HashSet<u64>,
    /// The config version the agent persisted as last-good.
    agent_config: u64,
    applies: VecDeque<(u64, String)>,
    deliveries: VecDeque<(ConnId, Vec<Envelope>)>,
    /// Downlink message ids in the order the local broker accepted them.
    broker_log: Vec<u64>,
    broker_seen: HashSet<u64>,
    reconnect_at: Option<Instant>,
    /// After `Welcomed`, the next `AckUpTo` is the resume skip, not an `Ack`.
    resume_skip: bool,
    links: Vec<Link>,
    // The hub.
    pending: VecDeque<Pending>,
    /// Message ids the cloud broker published (and the order of first publication).
    published: HashSet<u64>,
    publish_order: Vec<u64>,
    /// Durable: incarnation -> committed mark.
    committed: BTreeMap<u64, u64>,
    broker_up: bool,
    config: Option<ConfigOffer>,
    config_rejected: Option<u64>,
    downlink: BTreeMap<u64, u64>,
    downlink_acked: u64,
    downlink_next: u64,
    next_dl_msg: u64,
    /// Refusals whose `Refused` was lost with a connection after the hub committed them: the next
    /// `Welcome`'s high-water mark covers them, so the resume skip acknowledges them with no dead letter.
    /// The protocol cannot avoid it (the hub keeps no refusal once committed); counted, not failed.
    pub refusals_lost_at_resume: usize,
    /// Messages appended after a restore on seqs the hub had committed (undetectable by the protocol).
    pub at_risk_after_restore: usize,
    restored_floor: Option<(u64, u64)>,
    /// Counters for the test's own sanity (the schedules must exercise something).
    pub stats: Stats,
}

/// What happened in a run.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub connections: usize,
    pub acks: usize,
    pub dead_letters: usize,
    pub restarts_above: usize,
    pub config_applied: usize,
    pub config_rejected: usize,
    pub downlink_acked: usize,
    pub stale_delivered: usize,
    pub unavailable: usize,
    pub protocol_errors: usize,
}

fn agent_cfg() -> AgentConfig {
    AgentConfig {
        agent_name: "line1".into(),
        lane: 0,
        capabilities: Capabilities::RETRY_AFTER
            | Capabilities::CONFIG_PUSH
            | Capabilities::DOWNLINK,
        // Four, so the hub holds some `Ack`s back (it may while fewer than half the window wait).
        window: 4,
        handshake_timeout: Duration::from_secs(10),
        versions: shared::wire::SUPPORTED,
        keepalive: Some(Keepalive {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        }),
        ack_timeout: None,
    }
}

fn hub_cfg() -> HubConfig {
    HubConfig {
        max_frame_size: 1 << 20,
        max_message_size: 1 << 16,
        capabilities: Capabilities::CONFIG_PUSH | Capabilities::DOWNLINK,
        hello_timeout: Duration::from_secs(10),
        versions: shared::wire::SUPPORTED,
        software_version: "harness".into(),
        keepalive: Some(Keepalive {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
        }),
        downlink_window: 2,
        downlink_ack_timeout: None,
        ack_delay: Duration::from_millis(5),
    }
}

fn envelope(origin: &str, seq: u64, id: u64) -> Envelope {
    Envelope {
        origin: origin.into(),
        seq,
        topic: "t".into(),
        payload: Bytes::copy_from_slice(&id.to_be_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        trace: None,
        enqueued_at_ms: 0,
    }
}

fn id_of(e: &Envelope) -> u64 {
    u64::from_be_bytes(e.payload[..8].try_into().expect("8-byte payload"))
}

/// Whether the cloud broker refuses this message for good.
pub fn refused(id: u64) -> bool {
    id % 7 == 3
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        let base = Instant::now();
        Self {
            base,
            now: base,
            delay: Duration::from_millis(5),
            agent: AgentLink::new(agent_cfg(), 0),
            queue: ModelQueue {
                incarnation: 1,
                acked: 0,
                next_seq: 1,
                entries: BTreeMap::new(),
            },
            snapshot: None,
            next_msg: 1,
            next_incarnation: 2,
            lost: HashSet::new(),
            dead_letters: HashSet::new(),
            agent_config: 0,
            applies: VecDeque::new(),
            deliveries: VecDeque::new(),
            broker_log: Vec::new(),
            broker_seen: HashSet::new(),
            reconnect_at: Some(base),
            resume_skip: false,
            links: Vec::new(),
            pending: VecDeque::new(),
            published: HashSet::new(),
            publish_order: Vec::new(),
            committed: BTreeMap::new(),
            broker_up: true,
            config: None,
            config_rejected: None,
            downlink: BTreeMap::new(),
            downlink_acked: 0,
            downlink_next: 1,
            next_dl_msg: 1,
            refusals_lost_at_resume: 0,
            at_risk_after_restore: 0,
            restored_floor: None,
            stats: Stats::default(),
        }
    }

    pub fn apply(&mut self, step: &Step) {
        match *step {
            Step::Append(n) => {
                for _ in 0..n {
                    let seq = self.queue.next_seq;
                    self.queue.next_seq += 1;
                    if self
                        .restored_floor
                        .is_some_and(|(inc, hw)| inc == self.queue.incarnation && seq <= hw)
                    {
                        // A seq the hub already committed for this incarnation, taken again after a
                        // restore before any handshake could tell: undetectable (see the report).
                        self.lost.insert(self.next_msg);
                        self.at_risk_after_restore += 1;
                    }
                    self.queue.entries.insert(seq, self.next_msg);
                    self.next_msg += 1;
                }
            }
            Step::DownlinkAppend(n) => {
                for _ in 0..n {
                    self.downlink.insert(self.downlink_next, self.next_dl_msg);
                    self.downlink_next += 1;
                    self.next_dl_msg += 1;
                }
            }
            Step::Advance(ms) => self.advance(Duration::from_millis(ms.into())),
            Step::Delay(ms) => self.delay = Duration::from_millis(ms.into()),
            Step::Cut { keep, notify } => {
                if let Some(i) = self.current_link() {
                    self.cut(i, keep.into());
                    if notify {
                        let id = self.links[i].id;
                        self.agent.connection_lost(id);
                        self.reconnect_at = Some(self.now + RECONNECT);
                    }
                }
            }
            Step::DeliverStale { pick, dup } => self.deliver_stale(pick.into(), dup),
            Step::HubCommit => self.hub_commit(true),
            Step::HubPublishOnly => self.hub_commit(false),
            Step::HubRestart => {
                for i in 0..self.links.len() {
                    if !self.links[i].dead {
                        self.cut(i, 0);
                    }
                    self.links[i].hub.connection_lost();
                }
                self.pending.clear();
                if let Some(id) = self.agent.conn() {
                    self.agent.connection_lost(id);
                    self.reconnect_at = Some(self.now + RECONNECT);
                }
            }
            Step::AgentRestart => self.agent_restart(None),
            Step::Snapshot => self.snapshot = Some(self.queue.clone()),
            Step::Restore => {
                if let Some(snapshot) = self.snapshot.clone() {
                    // A restore takes the agent away for a while: what the hub had in flight is settled.
                    while !self.pending.is_empty() {
                        self.hub_commit(true);
                    }
                    for link in &mut self.links {
                        link.stale_to_hub.clear();
                        link.stale_to_agent.clear();
                    }
                    self.restored_floor = self
                        .committed
                        .get(&snapshot.incarnation)
                        .map(|&hw| (snapshot.incarnation, hw));
                    self.agent_restart(Some(snapshot));
                }
            }
            Step::AgentShell => self.agent_shell(),
            Step::PushConfig { bad } => {
                let version = self.config.as_ref().map_or(0, |c| c.version) + 1;
                let body = if bad {
                    format!("bad config {version}")
                } else {
                    format!("config {version}")
                };
                let offer = ConfigOffer { version, body };
                self.config = Some(offer.clone());
                for link in &mut self.links {
                    link.hub.push_config(offer.clone());
                }
            }
            Step::Broker(up) => self.broker_up = up,
        }
        self.pump();
    }

    fn current_link(&self) -> Option<usize> {
        let id = self.agent.conn()?;
        self.links.iter().position(|l| l.id == id && !l.dead)
    }

    fn cut(&mut self, i: usize, keep: usize) {
        let link = &mut self.links[i];
        link.dead = true;
        let mut to_hub: VecDeque<Frame> = link.to_hub.drain(..).map(|(_, f)| f).collect();
        to_hub.truncate(keep);
        link.stale_to_hub = to_hub;
        let mut to_agent: VecDeque<Frame> = link.to_agent.drain(..).map(|(_, f)| f).collect();
        to_agent.truncate(keep);
        link.stale_to_agent = to_agent;
    }

    fn deliver_stale(&mut self, pick: usize, dup: bool) {
        let candidates: Vec<usize> = (0..self.links.len())
            .filter(|&i| {
                self.links[i].dead
                    && (!self.links[i].stale_to_hub.is_empty()
                        || !self.links[i].stale_to_agent.is_empty())
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[pick % candidates.len()];
        self.stats.stale_delivered += 1;
        let now = self.now;
        let link = &mut self.links[i];
        if pick % 2 == 0 && !link.stale_to_hub.is_empty() || link.stale_to_agent.is_empty() {
            let frame = if dup {
                link.stale_to_hub.front().cloned()
            } else {
                link.stale_to_hub.pop_front()
            };
            if let Some(frame) = frame {
                link.hub.handle_frame(frame, now);
            }
        } else {
            // A stream never duplicates: only a connection the agent left behind can see a frame twice
            // (as it would if a buggy shell fed it one).
            let current = self.agent.conn() == Some(link.id);
            let frame = if dup && !current {
                link.stale_to_agent.front().cloned()
            } else {
                link.stale_to_agent.pop_front()
            };
            if let Some(frame) = frame {
                let id = link.id;
                self.agent.handle_frame(id, frame, now);
            }
        }
    }

    fn agent_restart(&mut self, restore: Option<ModelQueue>) {
        for i in 0..self.links.len() {
            if !self.links[i].dead {
                self.cut(i, 0);
            }
            // Nothing of the old process's connections can reach the new process.
            self.links[i].stale_to_agent.clear();
        }
        if let Some(snapshot) = restore {
            for id in self.queue.entries.values() {
                if !snapshot.entries.values().any(|v| v == id) {
                    self.lost.insert(*id);
                }
            }
            // Messages acknowledged after the snapshot come back; the ones written after it are gone.
            let newest = snapshot.entries.values().max().copied().unwrap_or(0);
            for id in newest + 1..self.next_msg {
                if !self.published.contains(&id) && !self.dead_letters.contains(&id) {
                    self.lost.insert(id);
                }
            }
            self.queue = snapshot;
        }
        self.agent = AgentLink::new(agent_cfg(), self.agent_config);
        self.applies.clear();
        self.deliveries.clear();
        self.resume_skip = false;
        self.reconnect_at = Some(self.now + RECONNECT);
    }

    fn hub_commit(&mut self, commit: bool) {
        let Some(p) = self.pending.front_mut() else {
            return;
        };
        if !p.published {
            p.published = true;
            for e in &p.entries {
                let id = id_of(e);
                if refused(id) {
                    continue;
                }
                // Resume never skips: every earlier live message was published before this one.
                if self.published.insert(id) {
                    self.publish_order.push(id);
                }
            }
        }
        if !commit {
            return;
        }
        let p = self.pending.pop_front().expect("checked above");
        let upto = p.entries.last().expect("non-empty batch").seq;
        let mark = self.committed.entry(p.incarnation).or_insert(0);
        *mark = (*mark).max(upto);
        let refusals = p
            .entries
            .iter()
            .filter(|e| refused(id_of(e)))
            .map(|e| Refusal {
                seq: e.seq,
                reason_code: 0x87,
                detail: "not authorized".into(),
            })
            .collect();
        let now = self.now;
        self.links[p.link].hub.committed(upto, refusals, now);
    }

    fn agent_shell(&mut self) {
        while let Some((version, body)) = self.applies.pop_front() {
            let result = if body.contains("bad") {
                Err(ConfigRejection {
                    reason: ConfigRejectReason::Invalid,
                    detail: "bad".into(),
                })
            } else {
                self.agent_config = self.agent_config.max(version);
                Ok(())
            };
            self.agent.config_applied(version, result);
        }
        while let Some((conn, entries)) = self.deliveries.pop_front() {
            let mut last = 0;
            for e in &entries {
                let id = id_of(e);
                if self.broker_seen.insert(id) {
                    // None skipped: every earlier downlink message reached the broker first.
                    assert!(
                        (1..id).all(|earlier| self.broker_seen.contains(&earlier)),
                        "downlink message {id} delivered before an earlier one"
                    );
                }
                self.broker_log.push(id);
                last = e.seq;
            }
            self.agent.downlink_delivered(conn, last);
        }
    }

    /// Moves time forward by `by`, stopping at every deadline on the way.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            self.pump();
            let next = self.next_wake().filter(|&t| t <= end);
            match next {
                Some(t) if t > self.now => self.now = t,
                Some(_) => {
                    // Due now and pump did not consume it: step a little to avoid spinning.
                    self.now += Duration::from_millis(1);
                }
                None => {
                    self.now = end;
                    self.pump();
                    return;
                }
            }
            if self.now >= end {
                self.pump();
                return;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut at: Vec<Instant> = Vec::new();
        at.extend(self.agent.poll_timeout());
        at.extend(self.reconnect_at);
        for link in &self.links {
            at.extend(link.hub.poll_timeout());
            if !link.dead {
                at.extend(link.to_hub.front().map(|(t, _)| *t));
                at.extend(link.to_agent.front().map(|(t, _)| *t));
            }
        }
        at.into_iter().min()
    }

    /// Runs every machine and model until nothing more happens at `now`.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            if !self.pump_once() {
                return;
            }
        }
        panic!("the world does not settle");
    }

    fn pump_once(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        if self.agent.conn().is_none() && self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            let id = self.agent.connect(now, self.queue.marks());
            self.stats.connections += 1;
            self.links.push(Link {
                id,
                hub: HubConn::new(now, hub_cfg(), Admission::Site { max_topic_len: 100 }),
                incarnation: None,
                to_hub: VecDeque::new(),
                to_agent: VecDeque::new(),
                dead: false,
                closing_by_agent: false,
                closing_by_hub: false,
                stale_to_hub: VecDeque::new(),
                stale_to_agent: VecDeque::new(),
            });
            progress = true;
        }
        // Timeouts.
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        for link in &mut self.links {
            if link.hub.poll_timeout().is_some_and(|t| t <= now) {
                link.hub.handle_timeout(now);
            }
        }
        // Frames due.
        for i in 0..self.links.len() {
            if self.links[i].dead {
                continue;
            }
            while self.links[i].to_hub.front().is_some_and(|(t, _)| *t <= now) {
                let (_, frame) = self.links[i].to_hub.pop_front().expect("checked");
                self.links[i].hub.handle_frame(frame, now);
                progress = true;
            }
            while self.links[i]
                .to_agent
                .front()
                .is_some_and(|(t, _)| *t <= now)
            {
                let (_, frame) = self.links[i].to_agent.pop_front().expect("checked");
                let id = self.links[i].id;
                self.agent.handle_frame(id, frame, now);
                progress = true;
            }
        }
        progress |= self.hub_events();
        progress |= self.agent_actions();
        progress |= self.agent_send();
        progress |= self.hub_send();
        progress |= self.transmit();
        progress |= self.finish_closes();
        progress
    }

    /// A connection one end closed is gone once its last frames arrived; the other end learns it.
    fn finish_closes(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            let done = !link.dead
                && ((link.closing_by_agent && link.to_hub.is_empty())
                    || (link.closing_by_hub && link.to_agent.is_empty()));
            if done {
                link.dead = true;
                link.hub.connection_lost();
                let id = link.id;
                self.agent.connection_lost(id);
                progress = true;
            }
        }
        if self.agent.conn().is_none() && self.reconnect_at.is_none() {
            self.reconnect_at = Some(self.now + RECONNECT);
        }
        progress
    }

    fn hub_events(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.links.len() {
            while let Some(event) = self.links[i].hub.poll_event() {
                progress = true;
                match event {
                    HubEvent::Hello { incarnation, .. } => {
                        self.links[i].incarnation = Some(incarnation);
                        if self.broker_up {
                            let resume = Resume {
                                committed: self
                                    .committed
                                    .get(&incarnation)
                                    .map(|&hw| (incarnation, hw)),
                                config: self.config.clone(),
                                config_rejected: self.config_rejected,
                                downlink_acked: self.downlink_acked,
                                downlink_written: self.downlink_next - 1,
                            };
                            self.links[i].hub.welcome(self.now, 100, resume);
                        } else {
                            self.stats.unavailable += 1;
                            self.links[i].hub.refuse(
                                GoAwayCode::Unavailable,
                                "cloud broker down".into(),
                                Some(Duration::from_secs(1)),
                            );
                        }
                    }
                    HubEvent::NewIncarnation { .. } => {}
                    HubEvent::PublishBatch { entries } => {
                        let incarnation = self.links[i].incarnation.expect("Hello came first");
                        self.pending.push_back(Pending {
                            link: i,
                            incarnation,
                            entries,
                            published: false,
                        });
                    }
                    HubEvent::ConfigApplied { version } => {
                        self.stats.config_applied += 1;
                        assert!(
                            !self
                                .config
                                .as_ref()
                                .is_some_and(|c| c.version == version && c.body.contains("bad")),
                            "agent claims to run a bad config"
                        );
                    }
                    HubEvent::ConfigRejected { version, rejection } => {
                        self.stats.config_rejected += 1;
                        if rejection.reason != ConfigRejectReason::Stale {
                            self.config_rejected = Some(version);
                        }
                    }
                    HubEvent::DownlinkAcked { upto } => {
                        self.stats.downlink_acked += 1;
                        for (&seq, id) in self.downlink.range(..=upto) {
                            assert!(
                                self.broker_seen.contains(id),
                                "downlink seq {seq} (message {id}) acknowledged before the local broker took it"
                            );
                        }
                        self.downlink = self.downlink.split_off(&(upto + 1));
                        self.downlink_acked = self.downlink_acked.max(upto);
                    }
                    HubEvent::Closed { end } => {
                        if matches!(end, HubEnd::Protocol(_)) {
                            self.stats.protocol_errors += 1;
                        }
                        self.links[i].closing_by_hub = true;
                    }
                }
            }
        }
        progress
    }

    fn agent_actions(&mut self) -> bool {
        let mut progress = false;
        while let Some(action) = self.agent.poll_action() {
            progress = true;
            match action {
                AgentAction::Welcomed { hub_high_water, .. } => {
                    self.resume_skip = hub_high_water > self.queue.acked;
                }
                AgentAction::AckUpTo { upto } => {
                    let skip = std::mem::take(&mut self.resume_skip);
                    for (&seq, &id) in self.queue.entries.range(..=upto) {
                        if self.lost.contains(&id) {
                            continue;
                        }
                        // No entry is acknowledged that the hub did not publish (or refuse) first.
                        assert!(
                            self.published.contains(&id) || refused(id),
                            "seq {seq} (message {id}) acknowledged but never published"
                        );
                        if refused(id) && !self.dead_letters.contains(&id) {
                            // A refused entry is dead-lettered before the Ack that covers it.
                            assert!(
                                skip,
                                "seq {seq} (message {id}) acknowledged before its dead letter"
                            );
                            self.refusals_lost_at_resume += 1;
                        }
                    }
                    self.queue.entries = self.queue.entries.split_off(&(upto + 1));
                    self.queue.acked = self.queue.acked.max(upto);
                    self.stats.acks += 1;
                }
                AgentAction::DeadLetter { seq, .. } => {
                    self.resume_skip = false;
                    let id =
                        *self.queue.entries.get(&seq).unwrap_or_else(|| {
                            panic!("dead letter for seq {seq}, not in the queue")
                        });
                    assert!(
                        refused(id),
                        "message {id} dead-lettered but the broker took it"
                    );
                    self.dead_letters.insert(id);
                    self.stats.dead_letters += 1;
                }
                AgentAction::ApplyConfig { version, body } => {
                    self.resume_skip = false;
                    self.applies.push_back((version, body));
                }
                AgentAction::DeliverDownlink { conn, entries } => {
                    self.resume_skip = false;
                    self.deliveries.push_back((conn, entries));
                }
                AgentAction::Closed { conn, end } => {
                    self.resume_skip = false;
                    let mut wait = RECONNECT;
                    match end {
                        AgentEnd::Restarted { hub_high_water, .. } => {
                            self.stats.restarts_above += 1;
                            let incarnation = self.next_incarnation;
                            self.next_incarnation += 1;
                            self.queue.restart_above(hub_high_water, incarnation);
                            wait = Duration::ZERO;
                        }
                        AgentEnd::GoAway {
                            retry_after: Some(after),
                            ..
                        } => wait = after,
                        AgentEnd::Protocol(v) => panic!("the hub broke the protocol: {v}"),
                        _ => {}
                    }
                    // Flush what the machine queued (a GoAway); the hub sees the close after it.
                    self.transmit();
                    if let Some(link) = self.links.iter_mut().find(|l| l.id == conn && !l.dead) {
                        link.closing_by_agent = true;
                    }
                    self.reconnect_at = Some(self.now + wait);
                }
            }
        }
        progress
    }

    /// The agent's shell fills the window from the queue.
    fn agent_send(&mut self) -> bool {
        // Frames the machine queued go first, as on a real stream.
        let mut progress = self.transmit();
        while let Some(from) = self.agent.next_send() {
            let batch: Vec<Envelope> = self
                .queue
                .entries
                .range(from..)
                .take(BATCH)
                .map(|(&seq, &id)| envelope("line1", seq, id))
                .collect();
            let Some(last) = batch.last().map(|e| e.seq) else {
                self.agent.queue_written(from - 1);
                break;
            };
            self.agent.batches_sent(self.now, last, [last]);
            self.push_to_hub(Frame::Batch { entries: batch });
            progress = true;
        }
        if self.agent.is_open() {
            self.agent.queue_written(self.queue.next_seq - 1);
            progress |= self.agent.next_send().is_some();
        }
        progress
    }

    /// The hub's shell fills each connection's downlink window.
    fn hub_send(&mut self) -> bool {
        let mut progress = self.transmit();
        let written = self.downlink_next - 1;
        for i in 0..self.links.len() {
            self.links[i].hub.downlink_written(written);
            while let Some(from) = self.links[i].hub.next_downlink_send() {
                let batch: Vec<Envelope> = self
                    .downlink
                    .range(from..)
                    .take(BATCH)
                    .map(|(&seq, &id)| envelope("cloud", seq, id))
                    .collect();
                let Some(last) = batch.last().map(|e| e.seq) else {
                    self.links[i].hub.downlink_written(from - 1);
                    break;
                };
                self.links[i].hub.downlink_sent(self.now, last, [last]);
                let at = self.arrival(&self.links[i].to_agent);
                self.links[i]
                    .to_agent
                    .push_back((at, Frame::Downlink { entries: batch }));
                progress = true;
            }
        }
        progress
    }

    fn arrival(&self, q: &VecDeque<(Instant, Frame)>) -> Instant {
        let at = self.now + self.delay;
        q.back().map_or(at, |(t, _)| at.max(*t))
    }

    fn push_to_hub(&mut self, frame: Frame) {
        let latest = self.links.len().checked_sub(1);
        if let Some(i) = latest.filter(|&i| !self.links[i].dead && !self.links[i].closing_by_agent)
        {
            let at = self.arrival(&self.links[i].to_hub);
            self.links[i].to_hub.push_back((at, frame));
        }
    }

    fn transmit(&mut self) -> bool {
        let mut progress = false;
        while let Some(frame) = self.agent.poll_transmit() {
            progress = true;
            self.push_to_hub(frame);
        }
        for i in 0..self.links.len() {
            while let Some(frame) = self.links[i].hub.poll_transmit() {
                progress = true;
                if self.links[i].dead {
                    // Written into a connection that is already cut: never arrives (only what was in
                    // flight at the cut may, and a stream cannot skip a frame to deliver a later one).
                } else {
                    let at = self.arrival(&self.links[i].to_agent);
                    self.links[i].to_agent.push_back((at, frame));
                }
            }
        }
        progress
    }

    /// No more faults: the broker is up, the network is quick, the hub commits and the agent's shell works
    /// until everything is delivered, acknowledged and converged.
    pub fn heal(&mut self) {
        self.broker_up = true;
        self.delay = Duration::from_millis(5);
        for _ in 0..5_000 {
            while !self.pending.is_empty() {
                self.hub_commit(true);
            }
            self.agent_shell();
            self.advance(Duration::from_millis(50));
            if self.settled() {
                return;
            }
        }
        panic!(
            "no convergence: queue {:?}, pending {}, downlink {:?}, config {:?}/{:?} agent {}",
            self.queue,
            self.pending.len(),
            self.downlink,
            self.config.as_ref().map(|c| c.version),
            self.config_rejected,
            self.agent.config_version()
        );
    }

    fn settled(&self) -> bool {
        self.agent.is_open()
            && self.queue.entries.is_empty()
            && self.pending.is_empty()
            && self.downlink.is_empty()
            && self.applies.is_empty()
            && self.deliveries.is_empty()
            && self.config_converged()
            && self
                .links
                .iter()
                .all(|l| l.dead || (l.to_hub.is_empty() && l.to_agent.is_empty()))
    }

    fn config_converged(&self) -> bool {
        match &self.config {
            None => true,
            Some(c) => {
                self.agent.config_version() == c.version || self.config_rejected == Some(c.version)
            }
        }
    }

    /// The liveness properties, after [`heal`](Self::heal).
    pub fn check_converged(&self) {
        // Every message is published (at least once) or dead-lettered, unless a restore lost it.
        for id in 1..self.next_msg {
            if self.lost.contains(&id) {
                continue;
            }
            if refused(id) {
                assert!(
                    self.dead_letters.contains(&id) || self.refusals_lost_at_resume > 0,
                    "refused message {id} neither dead-lettered nor acknowledged at resume"
                );
            } else {
                assert!(self.published.contains(&id), "message {id} never published");
            }
        }
        // In order: first publications follow append order among the messages that were not lost.
        let order: Vec<u64> = self
            .publish_order
            .iter()
            .copied()
            .filter(|id| !self.lost.contains(id))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "messages first published out of order");
        // Every downlink message reached the local broker, and the hub's queue is empty.
        for id in 1..self.next_dl_msg {
            assert!(
                self.broker_seen.contains(&id),
                "downlink message {id} never delivered"
            );
        }
        assert!(self.config_converged());
    }
}
