//! `#[rpc::service]` rejects signatures it cannot serve, with the error on
//! the offending token. Regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p rpc --test compile_fail`, then read
//! every changed `.stderr`.

#[test]
fn invalid_services_do_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
}
