//! Loopback ports for registry servers that a test starts itself.
//!
//! Binding port 0 and releasing it hands out a port from the kernel's
//! ephemeral range, the same range every outgoing connection's source port
//! comes from: until the server binds it, any client socket on the machine
//! (another test's, running in parallel) may take it. These ports come from
//! the 12,000 just below that range instead. Each test process starts at a
//! place of its own (from its pid) and walks forward, skipping ports that
//! something already listens on, so two processes meet only by chance and a
//! client never does.

use std::sync::atomic::{AtomicU32, Ordering};

const SPAN: u32 = 12_000;

/// The lowest ephemeral port, from the kernel's setting (32768 if unreadable).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn bindable(port: u32) -> bool {
    u16::try_from(port).is_ok_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A port P with P + offset free too, for each of `offsets` (servers that
/// derive further ports from their base port, like Nacos).
pub fn free_port_with(offsets: &[u16]) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let top = u32::from(offsets.iter().copied().max().unwrap_or(0));
    let low = ephemeral_low().saturating_sub(SPAN + top).max(1024);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let base = low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if bindable(base) && offsets.iter().all(|o| bindable(base + u32::from(*o))) {
            if let Ok(port) = u16::try_from(base) {
                return port;
            }
        }
    }
    panic!("no free loopback port in {low}..{}", low + SPAN)
}

/// A loopback port nothing listens on (see the module docs).
pub fn free_port() -> u16 {
    free_port_with(&[])
}
