//! Bad command-line values are usage errors (exit 2, the flag named), not
//! panics: `Duration::from_secs_f64` panics on negatives, NaN and overflow,
//! and an unbounded `--concurrency` spawned that many tasks.

use std::process::Command;

const CONSUMER: &str = env!("CARGO_BIN_EXE_example-consumer");

#[test]
fn bad_values_are_refused_naming_the_flag() {
    for (flag, value) in [
        ("--duration", "-1"),
        ("--duration", "nan"),
        ("--duration", "0"),
        ("--wait", "inf"),
        ("--wait", "1e300"),
        ("--wait", "soon"),
        ("--concurrency", "100000000000"),
        ("--calls", "-3"),
    ] {
        let out = Command::new(CONSUMER)
            .args([flag, value])
            .env_remove("RPC_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
    }
}
