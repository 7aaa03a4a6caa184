//! Picking ports for daemons and instances before they start.
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range, the same
//! range every outgoing connection takes its local port from: on a busy host (a
//! 50-node cluster on loopback, say) another process's connection can take the port
//! between the pick and the daemon's bind. Ports are picked below that range
//! instead, where only explicit binds land.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};

/// Lowest port handed out when the ephemeral range starts high enough.
const FLOOR: u16 = 10_000;

/// `n` distinct TCP ports free on `ip` right now, below the ephemeral range when
/// there is room there (else wherever the kernel picks).
pub fn free_ports(ip: IpAddr, n: usize) -> io::Result<Vec<u16>> {
    let top = ephemeral_start().unwrap_or(32_768);
    let mut held = Vec::with_capacity(n);
    if top > FLOOR {
        let span = u32::from(top - FLOOR);
        let start = crate::p2p::rand_nonce() as u32 % span;
        for i in 0..span {
            if held.len() == n {
                break;
            }
            let port = FLOOR + ((start + i) % span) as u16;
            if let Ok(l) = TcpListener::bind(SocketAddr::new(ip, port)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        held.push(TcpListener::bind(SocketAddr::new(ip, 0))?);
    }
    held.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// One free TCP port on `ip` (see [`free_ports`]).
pub fn free_port(ip: IpAddr) -> io::Result<u16> {
    Ok(free_ports(ip, 1)?[0])
}

/// The first port of the kernel's ephemeral range (Linux).
fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let ports = free_ports(ip, 20).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
        if let Some(top) = ephemeral_start().filter(|t| *t > FLOOR) {
            assert!(ports.iter().all(|p| (FLOOR..top).contains(p)), "{ports:?} not in {FLOOR}..{top}");
        }
        for p in ports {
            TcpListener::bind(SocketAddr::new(ip, p)).expect("free");
        }
    }
}
