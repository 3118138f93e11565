//! Plain-text tables that fit an 80-column terminal, timestamps, JSON.
//! No colour is ever printed, so piping the output is always clean.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The width tables are fitted to (a classic terminal).
pub const WIDTH: usize = 80;

/// Renders `rows` under `headers`, columns two spaces apart, at most
/// [`WIDTH`] characters a line: while the table is too wide, the widest
/// column is narrowed (not below its header or 6 characters) and its cells
/// cut, ending in `…`. Control characters in cells are escaped
/// ([`clean`]), so registry data cannot break lines or print colour.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let floor: Vec<usize> = headers.iter().map(|h| h.chars().count().max(6)).collect();
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while total(&widths) > WIDTH {
        let widest = widths
            .iter()
            .enumerate()
            .filter(|(i, w)| **w > floor[*i])
            .max_by_key(|(_, w)| **w)
            .map(|(i, _)| i);
        match widest {
            Some(i) => widths[i] -= 1,
            // Every column at its floor: as narrow as it gets.
            None => break,
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            let cell = fit(cell, *w);
            let _ = write!(l, "{cell:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
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

/// `s` with control characters escaped (`\n`, `\u{1b}`): text from a
/// registry is printed as data, never as terminal commands.
pub fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One line for a labelled field (`describe`), cut to [`WIDTH`].
pub fn field(label: &str, value: &str) -> String {
    fit(&format!("{label:<12} {}", clean(value)), WIDTH)
}

/// Writes `text` to stdout. A reader that went away (`rpc … | head -1`)
/// ends the program quietly with success, as other command-line tools do,
/// instead of a panic.
pub fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// [`emit`] with a newline.
pub fn emit_line(text: &str) {
    emit(&format!("{text}\n"));
}

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-30T00:30:00.123Z`).
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-11-30T00:30:00Z`);
/// `None` for text that is not a number.
pub fn since(unix_secs: &str) -> Option<String> {
    let secs: u64 = unix_secs.parse().ok()?;
    // RFC 3339 ends at 9999-12-31T23:59:59Z; humantime cannot format past
    // it, and a record may say anything.
    if secs > 253_402_300_799 {
        return None;
    }
    let at = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    let mut text = String::new();
    write!(text, "{}", humantime::format_rfc3339_seconds(at)).ok()?;
    Some(text)
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
    fn a_wide_first_column_is_narrowed_too() {
        let key = "S".repeat(120);
        let t = table(&["SERVICE", "INSTANCES"], &[vec![key, "3".into()]]);
        for line in t.lines() {
            assert!(line.chars().count() <= WIDTH, "{line}");
        }
        assert!(t.lines().next().unwrap().ends_with("INSTANCES"), "{t}");
        assert!(t.lines().nth(1).unwrap().ends_with("…  3"), "{t}");
    }

    #[test]
    fn control_characters_are_escaped() {
        let t = table(&["A"], &[vec!["x\ny\u{1b}[31mRED".into()]]);
        assert_eq!(t, "A\nx\\ny\\u{1b}[31mRED\n");
        assert_eq!(field("LABEL", "a\tb"), "LABEL        a\\tb");
    }

    #[test]
    fn since_is_utc() {
        assert_eq!(since("0").as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(since("1796000000").as_deref(), Some("2026-11-30T00:53:20Z"));
        assert_eq!(since("soon"), None);
        assert_eq!(since("253402300800"), None, "past year 9999");
        assert_eq!(since(&u64::MAX.to_string()), None);
    }
}
