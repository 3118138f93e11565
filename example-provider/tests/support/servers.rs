//! Private registry servers for the chaos tests, each on free loopback ports
//! with a data directory of its own, started, killed and restarted by the
//! test itself: etcd (one member or a cluster), ZooKeeper (Debian's jar,
//! `ZooKeeperServerMain`), Consul (a single-server agent with a data dir, so
//! a restart keeps its state unless the directory is new) and rnacos (a
//! Nacos 2.x compatible server). Same flags as `scripts/registry-servers.sh`
//! and the rpc-registry tests, with distinct ports.
//!
//! Every process writes its output to a log file in the data directory and
//! is killed when its handle is dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::ports::{free_port, free_port_with};

pub const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
const ZK_CLASSPATH: &str = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar";
/// The Nacos 2.x client's gRPC port is the HTTP port + 1000.
pub const NACOS_GRPC_OFFSET: u16 = 1000;

/// Whether `program args...` runs and exits 0.
pub fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The rnacos binary: on the PATH or in cargo's bin directory.
pub fn rnacos_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("rnacos"))
                .collect()
        })
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        candidates.push(home.join("bin").join("rnacos"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// One HTTP/1.0 exchange (unchunked answer, connection closed by the
/// server); the status and the body. Bounded by 3 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    crate::common::http::exchange(addr, method, path, body, Duration::from_secs(3)).await
}

/// A server process writing to a log file; SIGKILLed on drop.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The last lines of its log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------ etcd

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub proc: Option<Proc>,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

/// An etcd cluster of one or more members on loopback, with the member flags
/// of `scripts/etcd-cluster-test.sh`.
pub struct Etcd {
    dir: PathBuf,
    generation: u32,
    pub members: Vec<EtcdMember>,
}

impl Etcd {
    pub fn start(dir: &Path, size: usize) -> Self {
        let members = (1..=size)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                proc: None,
            })
            .collect();
        let mut etcd = Self {
            dir: dir.to_owned(),
            generation: 0,
            members,
        };
        for i in 0..size {
            etcd.spawn_member(i);
        }
        etcd
    }

    fn spawn_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.join(format!("{}-{}", m.name, self.generation));
        let client = m.endpoint();
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", "rpc-chaos"])
            .args(["--initial-cluster-state", "new"]);
        let log = self.dir.join(format!("{}-{}.log", m.name, self.generation));
        self.members[i].proc = Some(Proc::spawn(cmd, &log));
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    pub fn kill(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Starts every member again on the same ports, with its data, or with
    /// new, empty data directories (a new cluster).
    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if empty {
            self.generation += 1;
        }
        for i in 0..self.members.len() {
            self.spawn_member(i);
        }
    }

    pub fn tail(&self) -> String {
        self.members
            .iter()
            .filter_map(|m| {
                m.proc
                    .as_ref()
                    .map(|p| format!("[{}]\n{}", m.name, p.tail()))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the current leader, from each member's status
    /// (`/v3/maintenance/status` of the gRPC gateway).
    pub async fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let addr: SocketAddr = ([127, 0, 0, 1], m.client_port).into();
            let Ok((200, body)) = http(addr, "POST", "/v3/maintenance/status", "{}").await else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let me = v["header"]["member_id"].as_str()?.to_owned();
            let leader = v["leader"].as_str()?.to_owned();
            if me == leader {
                return self.members.iter().position(|x| x.name == m.name);
            }
        }
        None
    }
}

// ------------------------------------------------------------- zookeeper

/// A standalone ZooKeeper 3.8 with tickTime 500 ms (sessions from 1 s), as
/// the servers script runs it.
pub struct Zookeeper {
    dir: PathBuf,
    generation: u32,
    pub port: u16,
    pub proc: Option<Proc>,
}

impl Zookeeper {
    pub fn start(dir: &Path) -> Self {
        let mut zk = Self {
            dir: dir.to_owned(),
            generation: 0,
            port: free_port(),
            proc: None,
        };
        zk.spawn();
        zk
    }

    fn spawn(&mut self) {
        let data = self.dir.join(format!("zk-{}", self.generation));
        std::fs::create_dir_all(&data).unwrap();
        let cfg = self.dir.join(format!("zoo-{}.cfg", self.generation));
        std::fs::write(
            &cfg,
            format!(
                "tickTime=500\nmaxSessionTimeout=60000\ndataDir={}\nclientPort={}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=srvr\n",
                data.display(),
                self.port
            ),
        )
        .unwrap();
        let mut cmd = Command::new("java");
        cmd.args(["-Xmx128m", "-cp", ZK_CLASSPATH])
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(&cfg);
        let log = self.dir.join(format!("zk-{}.log", self.generation));
        self.proc = Some(Proc::spawn(cmd, &log));
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if empty {
            self.generation += 1;
        }
        self.spawn();
    }

    pub fn tail(&self) -> String {
        self.proc.as_ref().map(Proc::tail).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- consul

/// A single-server Consul agent (not `-dev`: it keeps its state in its
/// data directory, so a restart on the same directory remembers every
/// service and check), with distinct ports and fast Raft timings.
pub struct Consul {
    dir: PathBuf,
    generation: u32,
    pub http: u16,
    ports: [u16; 3],
    pub proc: Option<Proc>,
}

impl Consul {
    pub fn start(dir: &Path) -> Self {
        let mut c = Self {
            dir: dir.to_owned(),
            generation: 0,
            http: free_port(),
            ports: [free_port(), free_port(), free_port()],
            proc: None,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let data = self.dir.join(format!("consul-{}", self.generation));
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = Command::new("consul");
        cmd.args([
            "agent",
            "-server",
            "-bootstrap-expect",
            "1",
            "-node",
            "chaos",
        ])
        .arg("-data-dir")
        .arg(&data)
        .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
        .args(["-http-port", &self.http.to_string()])
        .args(["-server-port", &self.ports[0].to_string()])
        .args(["-serf-lan-port", &self.ports[1].to_string()])
        .args(["-serf-wan-port", &self.ports[2].to_string()])
        .args(["-dns-port", "-1", "-grpc-port", "-1"])
        .args(["-hcl", "disable_update_check = true"])
        .args(["-hcl", "performance { raft_multiplier = 1 }"]);
        let log = self.dir.join(format!("consul-{}.log", self.generation));
        self.proc = Some(Proc::spawn(cmd, &log));
    }

    pub fn http_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.http).into()
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    /// Whether the agent has a leader (`/v1/status/leader` is a quoted address).
    pub async fn has_leader(&self) -> bool {
        matches!(
            http(self.http_addr(), "GET", "/v1/status/leader", "").await,
            Ok((200, body)) if body.trim().len() > 2
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if empty {
            self.generation += 1;
        }
        self.spawn();
    }

    pub fn tail(&self) -> String {
        self.proc.as_ref().map(Proc::tail).unwrap_or_default()
    }
}

// ----------------------------------------------------------------- nacos

/// rnacos on HTTP port P, gRPC P + 1000 (where Nacos 2.x clients look for
/// it) and console P + 2000, bound to loopback, run from its own directory
/// (it reads `./.env`), as the servers script runs it.
pub struct Nacos {
    dir: PathBuf,
    generation: u32,
    bin: PathBuf,
    pub http: u16,
    pub proc: Option<Proc>,
}

impl Nacos {
    pub fn start(dir: &Path, bin: PathBuf) -> Self {
        let http = free_port_with(&[NACOS_GRPC_OFFSET, 2 * NACOS_GRPC_OFFSET]);
        let mut n = Self {
            dir: dir.to_owned(),
            generation: 0,
            bin,
            http,
            proc: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let home = self.dir.join(format!("nacos-{}", self.generation));
        std::fs::create_dir_all(&home).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(&home)
            .env("RNACOS_SDK_HOST", "127.0.0.1")
            .env("RNACOS_CONSOLE_HOST", "127.0.0.1")
            .env("RNACOS_HTTP_PORT", self.http.to_string())
            .env(
                "RNACOS_GRPC_PORT",
                (self.http + NACOS_GRPC_OFFSET).to_string(),
            )
            .env(
                "RNACOS_HTTP_CONSOLE_PORT",
                (self.http + 2 * NACOS_GRPC_OFFSET).to_string(),
            )
            .env("RNACOS_DATA_DIR", home.join("db"));
        let log = self.dir.join(format!("nacos-{}.log", self.generation));
        self.proc = Some(Proc::spawn(cmd, &log));
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.http)
    }

    /// Whether the health endpoint answers "success".
    pub async fn healthy(&self) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.http).into();
        matches!(http(addr, "GET", "/health", "").await, Ok((200, body)) if body.contains("success"))
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if empty {
            self.generation += 1;
        }
        self.spawn();
    }

    pub fn tail(&self) -> String {
        self.proc.as_ref().map(Proc::tail).unwrap_or_default()
    }
}
