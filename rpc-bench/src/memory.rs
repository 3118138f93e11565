//! Resident memory of a process, from `/proc/PID/status` (Linux only; other
//! systems report nothing).

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...) of `pid`, or of
/// this process when `pid` is `None`.
pub fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    parse_field(&text, field)
}

fn parse_field(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let s = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(parse_field(s, "VmHWM"), Some(12345));
        assert_eq!(parse_field(s, "VmRSS"), Some(2048));
        assert_eq!(parse_field(s, "VmSwap"), None);
    }

    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            assert!(status_kib(None, "VmRSS").is_some_and(|k| k > 0));
        }
    }
}
