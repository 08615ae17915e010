//! Free loopback ports for the programs under test.
//!
//! A port is found by binding it and releasing it, so another socket could take it in between. Binding
//! port 0 would draw from the kernel's ephemeral range, the same range every `bind(0)` and every outgoing
//! connection of the programs draws from: the hub's embedded broker binds its internal listeners that
//! way, and once took the port a test had just reserved for the hub's own MQTT listener ("Address already
//! in use"). So ports are drawn at random *below* the ephemeral range (`ip_local_port_range`), where
//! nothing takes a port unless asked for that very port; port 0 is the fallback when that range is
//! too small or all tries were taken.

use std::hash::{BuildHasher, RandomState};
use std::net::{SocketAddr, TcpListener, UdpSocket};

/// The lowest port drawn from.
const LOWEST: u16 = 10_000;
/// Ports tried below the ephemeral range before falling back to port 0.
const TRIES: u64 = 64;

/// A TCP address on 127.0.0.1 that was free a moment ago.
pub fn free_tcp() -> SocketAddr {
    free(|addr| TcpListener::bind(addr).and_then(|l| l.local_addr()))
        .expect("bind a free TCP port on 127.0.0.1")
}

/// A UDP address on 127.0.0.1 that was free a moment ago (for the hub's QUIC endpoint).
pub fn free_udp() -> SocketAddr {
    free(|addr| UdpSocket::bind(addr).and_then(|s| s.local_addr()))
        .expect("bind a free UDP port on 127.0.0.1")
}

fn free(bind: impl Fn(SocketAddr) -> std::io::Result<SocketAddr>) -> std::io::Result<SocketAddr> {
    let highest = ephemeral_low().saturating_sub(1);
    if highest > LOWEST {
        let span = u64::from(highest - LOWEST) + 1;
        let random = RandomState::new();
        for attempt in 0..TRIES {
            let offset = random.hash_one(attempt) % span;
            let port = LOWEST + u16::try_from(offset).expect("span fits a port");
            if let Ok(addr) = bind(SocketAddr::from(([127, 0, 0, 1], port))) {
                return Ok(addr);
            }
        }
    }
    bind(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read: Linux's default).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_below_the_ephemeral_range_and_are_bindable() {
        let low = ephemeral_low();
        for _ in 0..20 {
            let tcp = free_tcp();
            let udp = free_udp();
            if low > LOWEST + 1 {
                assert!((LOWEST..low).contains(&tcp.port()), "{tcp}");
                assert!((LOWEST..low).contains(&udp.port()), "{udp}");
            }
            TcpListener::bind(tcp).expect("the TCP port is free");
            UdpSocket::bind(udp).expect("the UDP port is free");
        }
    }
}
