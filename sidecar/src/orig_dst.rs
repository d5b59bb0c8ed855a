//! The original destination of a connection redirected by iptables (`SO_ORIGINAL_DST`).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

/// Where the client meant to connect before iptables redirected it to us. Fails for a
/// connection that was not redirected (made straight to the listener).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let ipv4 = match stream.local_addr()?.ip() {
        IpAddr::V4(_) => true,
        // A dual-stack listener sees IPv4 clients as v4-mapped IPv6 addresses.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let addr = if ipv4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))
}
