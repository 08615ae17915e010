//! A userspace UDP proxy on loopback that sits between agents and the hub and damages the QUIC traffic on
//! command: drop, delay with jitter (every packet gets its own delay, so jitter reorders), duplicate,
//! explicit reordering (hold one packet, release it after the next), and blackholing, each set per
//! direction at run time.
//!
//! The agent's config points at [`UdpProxy::addr`]; the proxy forwards to the hub. Each agent address
//! (source IP and port) gets its own upstream socket, so the hub sees one client per agent and replies go
//! back to the agent they belong to; an agent that restarts (new source port) simply gets a new one.
//!
//! Random decisions come from a small deterministic generator seeded per proxy (and per direction), so a
//! failing run can be replayed with the same decisions for the same packet order: tests print the seed,
//! and `FAULT_SUITE_SEED` overrides it (see [`seed_for`]). Wall-clock timing of real processes still
//! varies between runs, so the packet order itself may not repeat exactly.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Largest datagram the proxy forwards (QUIC never sends more than 65,527 bytes of UDP payload).
const MAX_DATAGRAM: usize = 65_536;

/// How long a packet held for reordering waits for a successor before it is released anyway, so that
/// reordering never turns into loss at the end of a flight.
const HOLD_LIMIT: Duration = Duration::from_millis(50);

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the agent (client) to the hub (server).
    AgentToHub,
    /// From the hub back to the agent.
    HubToAgent,
}

impl Dir {
    /// Both directions.
    pub const BOTH: [Self; 2] = [Self::AgentToHub, Self::HubToAgent];

    fn index(self) -> usize {
        match self {
            Self::AgentToHub => 0,
            Self::HubToAgent => 1,
        }
    }
}

/// What the proxy does to the packets of one direction. The default forwards everything untouched.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Probability that a packet is dropped.
    pub drop: f64,
    /// Base delay added to every packet.
    pub delay: Duration,
    /// Each packet's delay is `delay` ± a uniform amount up to `jitter`, chosen per packet.
    pub jitter: Duration,
    /// Probability that a packet is sent twice (the copy right after the original, same delay).
    pub duplicate: f64,
    /// Probability that a packet is held back and released right after the next one of its direction.
    pub reorder: f64,
    /// Every packet of this direction is discarded.
    pub blackhole: bool,
}

impl Faults {
    /// Drops each packet with probability `p`.
    pub fn loss(p: f64) -> Self {
        Self {
            drop: p,
            ..Self::default()
        }
    }

    /// Discards everything.
    pub fn blackhole() -> Self {
        Self {
            blackhole: true,
            ..Self::default()
        }
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drop={} delay={:?}±{:?} duplicate={} reorder={} blackhole={}",
            self.drop, self.delay, self.jitter, self.duplicate, self.reorder, self.blackhole
        )
    }
}

/// Packet counts of one direction since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Packets received from the sender.
    pub received: u64,
    /// Packets sent on (copies included).
    pub forwarded: u64,
    /// Packets dropped by the loss probability.
    pub dropped: u64,
    /// Packets discarded by a blackhole.
    pub blackholed: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Packets held back for reordering.
    pub reordered: u64,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} forwarded={} dropped={} blackholed={} duplicated={} reordered={}",
            self.received,
            self.forwarded,
            self.dropped,
            self.blackholed,
            self.duplicated,
            self.reordered
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    blackholed: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Counts {
        Counts {
            received: self.received.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            blackholed: self.blackholed.load(Ordering::Relaxed),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            reordered: self.reordered.load(Ordering::Relaxed),
        }
    }
}

/// SplitMix64: tiny, deterministic, good enough to decide which packet to drop.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `true` with probability `p` (never draws for `p <= 0`, so an idle knob does not shift the stream).
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Where a packet of a direction goes: a socket and the address to send to.
#[derive(Debug, Clone)]
struct Sink {
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

impl Sink {
    async fn send(&self, packet: &[u8]) {
        // UDP: a failed send is a lost packet, which is what the transport above is built to survive.
        let _ = self.socket.send_to(packet, self.to).await;
    }
}

/// A packet held back for reordering, with a number so its release timer knows whether it is still held.
#[derive(Debug)]
struct Held {
    id: u64,
    packet: Bytes,
    sink: Sink,
    delay: Duration,
}

#[derive(Debug)]
struct DirState {
    faults: Faults,
    rng: Rng,
    held: Option<Held>,
    next_held_id: u64,
}

/// State shared by the proxy's tasks and its handle.
#[derive(Debug)]
struct Shared {
    dirs: [Mutex<DirState>; 2],
    counters: [Counters; 2],
    shutdown: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to do with one packet, decided under the direction's lock and carried out after it.
enum Plan {
    Discard,
    Send {
        copies: u8,
        delay: Duration,
        /// A previously held packet to send right after this one.
        release: Option<Held>,
    },
    Hold {
        id: u64,
    },
}

impl Shared {
    fn forward(self: &Arc<Self>, dir: Dir, packet: Bytes, sink: Sink) {
        let counters = &self.counters[dir.index()];
        counters.received.fetch_add(1, Ordering::Relaxed);
        let plan = {
            let mut st = lock(&self.dirs[dir.index()]);
            let f = st.faults;
            if f.blackhole {
                counters.blackholed.fetch_add(1, Ordering::Relaxed);
                Plan::Discard
            } else if st.rng.chance(f.drop) {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                Plan::Discard
            } else {
                let delay = jittered(&mut st.rng, f.delay, f.jitter);
                let copies = if st.rng.chance(f.duplicate) {
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                if st.held.is_none() && st.rng.chance(f.reorder) {
                    counters.reordered.fetch_add(1, Ordering::Relaxed);
                    let id = st.next_held_id;
                    st.next_held_id += 1;
                    // A held packet that was meant to be duplicated is released twice.
                    st.held = Some(Held {
                        id,
                        packet: packet.clone(),
                        sink: sink.clone(),
                        delay,
                    });
                    if copies == 2 {
                        self.send_later(dir, packet.clone(), sink.clone(), delay, 1);
                    }
                    Plan::Hold { id }
                } else {
                    Plan::Send {
                        copies,
                        delay,
                        release: st.held.take(),
                    }
                }
            }
        };
        match plan {
            Plan::Discard => {}
            Plan::Send {
                copies,
                delay,
                release,
            } => {
                self.send_later(dir, packet, sink, delay, copies);
                if let Some(held) = release {
                    self.send_later(dir, held.packet, held.sink, held.delay, 1);
                }
            }
            Plan::Hold { id } => {
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(HOLD_LIMIT).await;
                    let held = {
                        let mut st = lock(&shared.dirs[dir.index()]);
                        match &st.held {
                            Some(h) if h.id == id => st.held.take(),
                            _ => None,
                        }
                    };
                    if let Some(h) = held {
                        shared.send_later(dir, h.packet, h.sink, h.delay, 1);
                    }
                });
            }
        }
    }

    /// Sends `copies` copies of `packet` after `delay`; without a delay at once, from the caller's task,
    /// so undelayed packets leave in the order they arrived.
    fn send_later(&self, dir: Dir, packet: Bytes, sink: Sink, delay: Duration, copies: u8) {
        self.counters[dir.index()]
            .forwarded
            .fetch_add(u64::from(copies), Ordering::Relaxed);
        if delay.is_zero() {
            let mut left = copies;
            while left > 0 {
                match sink.socket.try_send_to(&packet, sink.to) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // Sent, or failed like any UDP send may: either way this copy is done.
                    _ => left -= 1,
                }
            }
            if left == 0 {
                return;
            }
            // The socket buffer is full: the rest waits for room, like a queue in a router.
            self.spawn_send(packet, sink, Duration::ZERO, left);
        } else {
            self.spawn_send(packet, sink, delay, copies);
        }
    }

    fn spawn_send(&self, packet: Bytes, sink: Sink, delay: Duration, copies: u8) {
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = async {
                    tokio::time::sleep(delay).await;
                    for _ in 0..copies {
                        sink.send(&packet).await;
                    }
                } => {}
            }
        });
    }
}

fn jittered(rng: &mut Rng, delay: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return delay;
    }
    // Uniform in [delay - jitter, delay + jitter], floored at zero.
    let offset = (rng.unit() * 2.0 - 1.0) * jitter.as_secs_f64();
    Duration::from_secs_f64((delay.as_secs_f64() + offset).max(0.0))
}

/// The seed for `test`: `FAULT_SUITE_SEED` when set (decimal), else a hash of the test's name, so every
/// test has its own fixed seed.
pub fn seed_for(test: &str) -> u64 {
    if let Some(seed) = std::env::var("FAULT_SUITE_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return seed;
    }
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    test.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A running proxy. Dropping it stops forwarding.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
}

impl UdpProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `target` (a loopback address), with every
    /// random decision drawn from `seed`.
    ///
    /// # Panics
    /// If `target` is not a loopback address or no port can be bound.
    pub async fn start(target: SocketAddr, seed: u64) -> Self {
        assert!(
            target.ip().is_loopback(),
            "the proxy forwards on loopback only"
        );
        let listen = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind the proxy's UDP port on 127.0.0.1"),
        );
        let addr = listen.local_addr().expect("proxy address");
        let dir_state = |salt: u64| {
            Mutex::new(DirState {
                faults: Faults::default(),
                rng: Rng(seed ^ salt),
                held: None,
                next_held_id: 0,
            })
        };
        let shared = Arc::new(Shared {
            dirs: [dir_state(0), dir_state(0x5555_5555_5555_5555)],
            counters: [Counters::default(), Counters::default()],
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(run(listen, target, shared.clone()));
        Self {
            addr,
            target,
            seed,
            shared,
        }
    }

    /// Where agents send: put this in the agent's `uplink.hub`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The seed of the proxy's random decisions.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Replaces the faults of direction `dir`.
    pub fn set(&self, dir: Dir, faults: Faults) {
        let released = {
            let mut st = lock(&self.shared.dirs[dir.index()]);
            st.faults = faults;
            if faults.reorder > 0.0 {
                None
            } else {
                st.held.take()
            }
        };
        if let Some(h) = released {
            self.shared.send_later(dir, h.packet, h.sink, h.delay, 1);
        }
    }

    /// Sets the same faults in both directions.
    pub fn set_both(&self, faults: Faults) {
        for dir in Dir::BOTH {
            self.set(dir, faults);
        }
    }

    /// Turns the blackhole of direction `dir` on or off, leaving its other faults as they are.
    pub fn blackhole(&self, dir: Dir, on: bool) {
        let mut faults = self.faults(dir);
        faults.blackhole = on;
        self.set(dir, faults);
    }

    /// Removes every fault in both directions.
    pub fn heal(&self) {
        self.set_both(Faults::default());
    }

    /// The current faults of direction `dir`.
    pub fn faults(&self, dir: Dir) -> Faults {
        lock(&self.shared.dirs[dir.index()]).faults
    }

    /// Packet counts of direction `dir` so far.
    pub fn counts(&self, dir: Dir) -> Counts {
        self.shared.counters[dir.index()].snapshot()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The proxy's receive loop for packets from agents; starts one return-path task per agent address.
async fn run(listen: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = listen.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP port unreachable from an earlier send surfaces here on some systems: keep going.
                Err(_) => continue,
            },
        };
        let upstream = match upstreams.get(&from) {
            Some(s) => s.clone(),
            None => {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let socket = Arc::new(socket);
                upstreams.insert(from, socket.clone());
                tokio::spawn(return_path(
                    socket.clone(),
                    Sink {
                        socket: listen.clone(),
                        to: from,
                    },
                    shared.clone(),
                ));
                socket
            }
        };
        let packet = Bytes::copy_from_slice(&buf[..len]);
        shared.forward(
            Dir::AgentToHub,
            packet,
            Sink {
                socket: upstream,
                to: target,
            },
        );
    }
}

/// Packets from the hub to one agent.
async fn return_path(upstream: Arc<UdpSocket>, agent: Sink, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = upstream.recv_from(&mut buf) => match r {
                Ok((len, _)) => len,
                Err(_) => continue,
            },
        };
        shared.forward(
            Dir::HubToAgent,
            Bytes::copy_from_slice(&buf[..len]),
            agent.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A UDP echo server on loopback that also reports every packet it received.
    struct Echo {
        addr: SocketAddr,
        seen: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    }

    async fn echo() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = socket.local_addr().expect("echo addr");
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = tx.send(buf[..len].to_vec());
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        Echo { addr, seen }
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
    }

    /// Everything that arrives on `socket` within `quiet` of the previous packet (or of the call).
    async fn drain(socket: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok(Ok(len)) = tokio::time::timeout(quiet, socket.recv(&mut buf)).await {
            out.push(buf[..len].to_vec());
        }
        out
    }

    async fn drain_seen(echo: &mut Echo, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(Some(p)) = tokio::time::timeout(quiet, echo.seen.recv()).await {
            out.push(p);
        }
        out
    }

    async fn send_numbered(socket: &UdpSocket, to: SocketAddr, n: u8) {
        for i in 0..n {
            socket.send_to(&[i], to).await.expect("send");
            // Keep the packets in order at the proxy without relying on socket buffering.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    const QUIET: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn forwards_both_ways_untouched_by_default() {
        let mut echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 1).await;
        let c = client().await;
        send_numbered(&c, proxy.addr(), 10).await;
        let back = drain(&c, QUIET).await;
        assert_eq!(back, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
        assert_eq!(drain_seen(&mut echo, QUIET).await.len(), 10);
        assert_eq!(proxy.counts(Dir::AgentToHub).forwarded, 10);
        assert_eq!(proxy.counts(Dir::HubToAgent).forwarded, 10);
    }

    #[tokio::test]
    async fn drop_all_drops_everything() {
        let mut echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 2).await;
        proxy.set(Dir::AgentToHub, Faults::loss(1.0));
        let c = client().await;
        send_numbered(&c, proxy.addr(), 20).await;
        assert!(drain(&c, QUIET).await.is_empty());
        assert!(drain_seen(&mut echo, QUIET).await.is_empty());
        let counts = proxy.counts(Dir::AgentToHub);
        assert_eq!((counts.received, counts.dropped), (20, 20), "{counts}");
    }

    #[tokio::test]
    async fn duplicate_all_doubles_every_packet() {
        let mut echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 3).await;
        proxy.set(
            Dir::AgentToHub,
            Faults {
                duplicate: 1.0,
                ..Faults::default()
            },
        );
        let c = client().await;
        send_numbered(&c, proxy.addr(), 5).await;
        let seen = drain_seen(&mut echo, QUIET).await;
        let expected: Vec<Vec<u8>> = (0..5u8).flat_map(|i| [vec![i], vec![i]]).collect();
        assert_eq!(seen, expected);
        // Only one direction duplicates: the ten echoes come back once each.
        assert_eq!(drain(&c, QUIET).await.len(), 10);
    }

    #[tokio::test]
    async fn delay_delays_and_jitter_reorders() {
        let echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 4).await;
        proxy.set(
            Dir::HubToAgent,
            Faults {
                delay: Duration::from_millis(200),
                ..Faults::default()
            },
        );
        let c = client().await;
        let start = Instant::now();
        c.send_to(b"x", proxy.addr()).await.expect("send");
        let mut buf = [0u8; 16];
        let len = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
            .await
            .expect("the echo comes back")
            .expect("recv");
        assert_eq!(&buf[..len], b"x");
        let rtt = start.elapsed();
        assert!(
            rtt >= Duration::from_millis(200),
            "round trip {rtt:?} < delay"
        );

        // 40 ms ± 35 ms per packet, sent 2 ms apart: some must overtake others, none is lost.
        proxy.set(
            Dir::HubToAgent,
            Faults {
                delay: Duration::from_millis(40),
                jitter: Duration::from_millis(35),
                ..Faults::default()
            },
        );
        send_numbered(&c, proxy.addr(), 30).await;
        let back: Vec<u8> = drain(&c, QUIET).await.into_iter().map(|p| p[0]).collect();
        let mut sorted = back.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..30).collect::<Vec<u8>>());
        assert_ne!(back, sorted, "jitter reordered nothing");
    }

    #[tokio::test]
    async fn reorder_swaps_a_held_packet_with_the_next() {
        let mut echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 5).await;
        proxy.set(
            Dir::AgentToHub,
            Faults {
                reorder: 1.0,
                ..Faults::default()
            },
        );
        let c = client().await;
        send_numbered(&c, proxy.addr(), 4).await;
        let seen: Vec<u8> = drain_seen(&mut echo, QUIET)
            .await
            .into_iter()
            .map(|p| p[0])
            .collect();
        assert_eq!(seen, vec![1, 0, 3, 2]);
        // A lone held packet is released after the hold limit, not lost.
        c.send_to(&[9], proxy.addr()).await.expect("send");
        let seen = drain_seen(&mut echo, QUIET).await;
        assert_eq!(seen, vec![vec![9]]);
    }

    #[tokio::test]
    async fn blackhole_cuts_one_direction_only_and_heals() {
        let mut echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 6).await;
        let c = client().await;

        proxy.blackhole(Dir::HubToAgent, true);
        send_numbered(&c, proxy.addr(), 5).await;
        assert_eq!(
            drain_seen(&mut echo, QUIET).await.len(),
            5,
            "agent to hub still flows"
        );
        assert!(drain(&c, QUIET).await.is_empty(), "hub to agent is cut");

        proxy.heal();
        proxy.blackhole(Dir::AgentToHub, true);
        send_numbered(&c, proxy.addr(), 5).await;
        assert!(drain_seen(&mut echo, QUIET).await.is_empty());
        assert!(drain(&c, QUIET).await.is_empty());

        proxy.heal();
        send_numbered(&c, proxy.addr(), 5).await;
        assert_eq!(drain(&c, QUIET).await.len(), 5);
        assert_eq!(proxy.counts(Dir::HubToAgent).blackholed, 5);
        assert_eq!(proxy.counts(Dir::AgentToHub).blackholed, 5);
    }

    #[tokio::test]
    async fn separate_clients_get_their_own_replies() {
        let echo = echo().await;
        let proxy = UdpProxy::start(echo.addr, 7).await;
        let (a, b) = (client().await, client().await);
        a.send_to(b"from-a", proxy.addr()).await.expect("send");
        b.send_to(b"from-b", proxy.addr()).await.expect("send");
        assert_eq!(drain(&a, QUIET).await, vec![b"from-a".to_vec()]);
        assert_eq!(drain(&b, QUIET).await, vec![b"from-b".to_vec()]);
    }

    #[test]
    fn same_seed_same_decisions() {
        let draws = |seed| {
            let mut rng = Rng(seed);
            (0..1000).map(|_| rng.chance(0.3)).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        let hits = draws(42).iter().filter(|&&d| d).count();
        assert!((250..350).contains(&hits), "{hits} of 1000 at p=0.3");
        assert_ne!(seed_for("a"), seed_for("b"));
    }
}
