//! Helpers for the tests that start private registry servers of their own
//! (`tests/{etcd,consul,zookeeper,nacos}.rs`): the binary-or-skip check and
//! throwaway TLS certificates. Their ports come from `common::ports`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::servers_required;

/// `found`, or else the test's one skip line naming what is `missing` (a
/// failure under `RPC_REQUIRE_SERVERS=1`).
pub fn found_or_skip(found: bool, backend: &str, test: &str, missing: &str) -> bool {
    if !found {
        assert!(
            !servers_required(),
            "RPC_REQUIRE_SERVERS=1 but {missing} (scripts/registry-servers.sh install {backend})"
        );
        skip_note!(
            "SKIP [{backend}] {test}: {missing} (scripts/registry-servers.sh install {backend})"
        );
    }
    found
}

/// Whether `program version_arg` runs, or a skip ([`found_or_skip`]).
pub fn binary_or_skip(backend: &str, test: &str, program: &str, version_arg: &str) -> bool {
    let found = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found_or_skip(
        found,
        backend,
        test,
        &format!("no `{program}` binary on the PATH"),
    )
}

/// A throwaway CA, a server certificate for 127.0.0.1/localhost and a
/// client certificate, all signed by the CA.
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes [`TestCerts`] in `dir` with the `openssl` binary. Without one the
/// test is skipped with one line, or fails under `RPC_REQUIRE_SERVERS=1`.
pub fn certs_or_skip(backend: &str, test: &str, dir: &Path) -> Option<TestCerts> {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(!servers_required(), "no openssl to make test certificates");
        skip_note!("SKIP [{backend}] {test}: no openssl binary to make test certificates");
        return None;
    }
    #[rustfmt::skip]
    openssl(
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
          "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem"],
        dir,
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap_or_else(|e| panic!("cannot write san.ext: {e}"));
    for who in ["server", "client"] {
        let (subj, key, csr, pem) = (
            format!("/CN={who}"),
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
        );
        #[rustfmt::skip]
        openssl(
            &["req", "-newkey", "rsa:2048", "-nodes", "-subj", &subj,
              "-keyout", &key, "-out", &csr],
            dir,
        );
        #[rustfmt::skip]
        openssl(
            &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
              "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", &pem],
            dir,
        );
    }
    Some(TestCerts {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}
