//! [`Host`]: a host string from configuration (`server.host`,
//! `server.advertise_host`, a registry address), parsed once.
//!
//! Every spelling the operating system accepts for an address is read as
//! that address, so that what is bound, what is published and what is
//! checked agree (issue 12, fault 5: `"::0"`, `"[::]"` or `"0.0.0.00"` were
//! bound as the wildcard by the OS but published exactly as written).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed host: an IP address, or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An IP address, however it was spelt.
    Ip(IpAddr),
    /// Anything else: a host name.
    Name(String),
}

impl Host {
    /// Parses `s`: surrounding whitespace and IPv6 brackets (`[::1]`) are
    /// removed; IPv6 in any standard form; IPv4 in dotted decimal, or in the
    /// forms the C library's `inet_aton` also accepts (parts with leading
    /// zeros, octal `010`, hex `0x7f`, fewer than four parts: `127.1`), since
    /// that is how the OS reads them when binding. Anything else is a name.
    pub fn parse(s: &str) -> Host {
        let s = s.trim();
        let inner = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Host::Ip(ip);
        }
        if let Some(v4) = inet_aton(inner) {
            return Host::Ip(IpAddr::V4(v4));
        }
        Host::Name(inner.to_owned())
    }

    /// Whether this is the unspecified ("any") address, `0.0.0.0` or `::`,
    /// in any spelling.
    pub fn is_unspecified(&self) -> bool {
        matches!(self, Host::Ip(ip) if ip.is_unspecified())
    }

    /// Whether this is a loopback address (`127.0.0.0/8`, `::1`, an
    /// IPv4-mapped loopback) or the name `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self {
            Host::Ip(IpAddr::V4(v4)) => v4.is_loopback(),
            Host::Ip(IpAddr::V6(v6)) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            Host::Name(n) => {
                n.eq_ignore_ascii_case("localhost")
                    || n.to_ascii_lowercase().ends_with(".localhost")
            }
        }
    }

    /// The unspecified address of the same family (`::` for names).
    pub fn unspecified(&self) -> IpAddr {
        match self {
            Host::Ip(IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// `host:port`, with an IPv6 address in brackets (`[::1]:80`), as
    /// socket address parsers and dialers want it.
    pub fn with_port(&self, port: u16) -> String {
        format!("{self}:{port}")
    }
}

/// The host as published and dialled: an IPv6 address in brackets.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// IPv4 as glibc's `inet_aton` reads it: 1 to 4 parts separated by dots,
/// each decimal, octal (leading `0`) or hex (`0x`); the last part fills the
/// remaining bytes. A hand-written parser because no maintained crate
/// offers this legacy form, and the OS binds it.
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    if s.is_empty() || s.ends_with('.') {
        return None;
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        // Digits only: `from_str_radix` would also take a sign.
        let v = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(hex, 16).ok()?
        } else if p.len() > 1 && p.starts_with('0') {
            if !p.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                return None;
            }
            u32::from_str_radix(&p[1..], 8).ok()?
        } else {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse::<u32>().ok()?
        };
        values.push(v);
    }
    let (last, head) = values.split_last()?;
    let mut addr: u32 = 0;
    for (i, v) in head.iter().enumerate() {
        if *v > 255 {
            return None;
        }
        addr |= v << (24 - 8 * i);
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 32 && *last >= (1u32 << room) {
        return None;
    }
    Some(Ipv4Addr::from(addr | last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_the_unspecified_address_is_the_wildcard() {
        for s in [
            "0.0.0.0",
            "::",
            "::0",
            "[::]",
            "0:0:0:0:0:0:0:0",
            "0.0.0.00",
            " 0.0.0.0 ",
            "0",
            "0x0",
            "00",
            "[0:0::0]",
        ] {
            assert!(Host::parse(s).is_unspecified(), "{s:?}");
        }
        for s in ["127.0.0.1", "localhost", "::1", "10.0.0.1", "host0"] {
            assert!(!Host::parse(s).is_unspecified(), "{s:?}");
        }
    }

    #[test]
    fn loopback_in_any_spelling() {
        for s in [
            "127.0.0.1",
            "127.1",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "127.0.0.01",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "localhost",
            "LOCALHOST",
            "a.localhost",
        ] {
            assert!(Host::parse(s).is_loopback(), "{s:?}");
        }
        for s in ["10.0.0.1", "0.0.0.0", "::", "example.com", "192.0.2.7"] {
            assert!(!Host::parse(s).is_loopback(), "{s:?}");
        }
    }

    #[test]
    fn legacy_ipv4_forms_read_as_the_os_reads_them() {
        let v4 = |s| match Host::parse(s) {
            Host::Ip(IpAddr::V4(v)) => v.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(v4("127.1"), "127.0.0.1");
        assert_eq!(v4("10.0.258"), "10.0.1.2");
        assert_eq!(v4("0x0a.010.0.1"), "10.8.0.1");
        assert_eq!(v4("3232235777"), "192.168.1.1");
        // Not addresses: names.
        for s in [
            "256.0.0.1",
            "1.2.3.4.5",
            "1..2",
            "08.0.0.1",
            "1.2.3.",
            "x1",
            "0x",
            "0x.0x",
            "0x+7f.1",
            "0+1.2.3.4",
            "+1.2.3.4",
            "1.2.3.0x100",
            "0x100000000",
        ] {
            assert!(matches!(Host::parse(s), Host::Name(_)), "{s:?}");
        }
    }

    #[test]
    fn display_brackets_ipv6_for_dialling() {
        assert_eq!(Host::parse("::1").with_port(80), "[::1]:80");
        assert_eq!(Host::parse("[fe80::1]").to_string(), "[fe80::1]");
        assert_eq!(Host::parse("0.0.0.00").with_port(1), "0.0.0.0:1");
        assert_eq!(Host::parse("db.example").with_port(5), "db.example:5");
    }
}
