//! `skip_note!`: the one line a skipped real-server test prints.
//!
//! It writes to the process's stderr directly, past the test harness's
//! output capture (which swallows `println!` of passing tests), so a plain
//! `cargo test` shows which backends were not exercised and why.

macro_rules! skip_note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // One write, so the line is not interleaved with the harness's output.
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}
