//! What every real-server test file shares, here and in example-provider's
//! chaos tests (which include this module by path):
//!
//! * `skip_note!`: the one line a skipped real-server test prints;
//! * `feature_stub!`: the test a file has instead when its backend's Cargo
//!   feature is off;
//! * [`ports`]: loopback ports for the servers a test starts itself;
//! * [`http`]: one plain HTTP/1.0 exchange with such a server.

pub mod http;
pub mod ports;

/// Writes one line to the process's stderr directly, past the test
/// harness's output capture (which swallows `println!` of passing tests), so
/// a plain `cargo test` shows which backends were not exercised and why.
macro_rules! skip_note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        // One write, so the line is not interleaved with the harness's output.
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// `feature_stub!(test_name, "feature", "what")`: without the feature, the
/// file's tests do not exist; this one test says so with a skip line, and
/// fails under `RPC_REQUIRE_SERVERS=1`, where a missing backend is an error.
macro_rules! feature_stub {
    ($test:ident, $feature:literal, $what:literal) => {
        #[cfg(not(feature = $feature))]
        #[test]
        fn $test() {
            let required = std::env::var("RPC_REQUIRE_SERVERS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "RPC_REQUIRE_SERVERS=1 but {} was built without the `{}` feature",
                env!("CARGO_PKG_NAME"),
                $feature
            );
            skip_note!(
                "SKIP [{}] {}: built without the `{}` feature (scripts/test.sh enables it)",
                $feature,
                $what,
                $feature
            );
        }
    };
}
