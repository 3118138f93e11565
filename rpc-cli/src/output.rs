//! Plain-text tables that fit an 80-column terminal, timestamps, JSON.
//! No colour is ever printed, so piping the output is always clean.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The width tables are fitted to (a classic terminal).
pub const WIDTH: usize = 80;

/// Renders `rows` under `headers`, columns two spaces apart. When the
/// table is wider than [`WIDTH`], the last column (the free-form one) is
/// cut to fit, ending in `…`; earlier columns are never cut.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let before = widths_before(&widths, cols);
    if let Some(last) = widths.last_mut() {
        *last = (*last).min(WIDTH.saturating_sub(before).max(8));
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let cell = fit(cell, *w);
            if i + 1 == cols {
                l.push_str(&cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The width taken by every column but the last, with separators.
fn widths_before(widths: &[usize], cols: usize) -> usize {
    widths
        .iter()
        .take(cols.saturating_sub(1))
        .map(|w| w + 2)
        .sum()
}

/// `s` cut to `width` characters, ending in `…` when cut.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-30T00:30:00.123Z`).
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-11-30T00:30:00Z`);
/// `None` for text that is not a number.
pub fn since(unix_secs: &str) -> Option<String> {
    let secs: u64 = unix_secs.parse().ok()?;
    let at = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// Pretty JSON of a value that is made of JSON already.
pub fn json(v: &impl serde::Serialize) -> String {
    // Serializing a serde_json::Value or our plain records cannot fail.
    serde_json::to_string_pretty(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_table_cuts_only_its_last_column_to_80() {
        let long = "k=".to_owned() + &"v".repeat(200);
        let t = table(
            &["ADDRESS", "WEIGHT", "METADATA"],
            &[
                vec!["127.0.0.1:40000".into(), "100".into(), long],
                vec!["10.0.0.1:1".into(), "5".into(), "a=b".into()],
            ],
        );
        for line in t.lines() {
            assert!(line.chars().count() <= WIDTH, "{line}");
        }
        let rows: Vec<&str> = t.lines().collect();
        assert!(rows[1].starts_with("127.0.0.1:40000  100     k=vvv"));
        assert!(rows[1].ends_with('…'));
        assert_eq!(rows[2], "10.0.0.1:1       5       a=b");
    }

    #[test]
    fn since_is_utc() {
        assert_eq!(since("0").as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(since("1796000000").as_deref(), Some("2026-11-30T00:53:20Z"));
        assert_eq!(since("soon"), None);
    }
}
