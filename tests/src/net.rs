//! Free loopback ports. A port is found by binding port 0 and releasing it; another process could take it
//! in between, which on a test machine is rare enough, and the programs under test fail loudly if it does.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// A TCP address on 127.0.0.1 that was free a moment ago.
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free TCP port on 127.0.0.1")
}

/// A UDP address on 127.0.0.1 that was free a moment ago (for the hub's QUIC endpoint).
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind a free UDP port on 127.0.0.1")
}
