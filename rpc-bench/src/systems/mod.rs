//! The three systems under test. Each has a server (serving until the
//! shutdown future completes) and a client (running one measurement).

pub mod echo;
pub mod rpc_fw;
pub mod tarpc_sys;

use std::fmt;
use std::str::FromStr;

/// Which system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// This framework through its public facade.
    Rpc,
    /// `Rpc` with one user layer on each side (a client layer and a server
    /// layer, each counting calls): what the open call path costs.
    RpcLayered,
    /// `RpcLayered` with bincode 2: comparable with builds from before
    /// postcard became the default (issue 13's A/B against `bb27f43`).
    RpcLayeredBincode,
    /// `Rpc` with the bincode 2 serializer (the default before postcard).
    RpcBincode,
    /// `Rpc` with the postcard serializer (issue 17: choosing the default).
    RpcPostcard,
    /// `Rpc` with the MessagePack serializer.
    RpcMsgPack,
    /// `Rpc` with every body compressed by lz4 (threshold 0 both ways).
    RpcLz4,
    /// `Rpc` with every body compressed by zstd (threshold 0 both ways).
    RpcZstd,
    /// `Rpc` over TLS 1.3 (rustls, a certificate made for the run).
    RpcTls,
    /// `Rpc` with `[metrics]` on and the Prometheus recorder installed in
    /// both processes (its endpoint listening, unscraped): what metrics
    /// cost (issue 16).
    RpcProm,
    /// tarpc 0.38, serde transport + bincode over TCP.
    Tarpc,
    /// A bare length-delimited echo with the same serialization.
    Echo,
    /// This framework as built by another `rpc-bench` binary (`run
    /// --baseline PATH`): the A/B against an earlier commit, in the same run.
    /// Never run by this binary itself.
    Baseline,
}

impl System {
    /// Every system, in report order.
    pub const ALL: [System; 3] = [System::Rpc, System::Tarpc, System::Echo];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            System::Rpc => "rpc",
            System::RpcLayered => "rpc-layered",
            System::RpcLayeredBincode => "rpc-layered-bincode",
            System::RpcBincode => "rpc-bincode",
            System::RpcPostcard => "rpc-postcard",
            System::RpcMsgPack => "rpc-msgpack",
            System::RpcLz4 => "rpc-lz4",
            System::RpcZstd => "rpc-zstd",
            System::RpcTls => "rpc-tls",
            System::RpcProm => "rpc-prom",
            System::Tarpc => "tarpc",
            System::Echo => "echo",
            System::Baseline => "rpc@base",
        }
    }
}

impl System {
    /// Whether this is the framework (it needs a registry directory).
    pub fn is_rpc(self) -> bool {
        matches!(
            self,
            System::Rpc
                | System::RpcLayered
                | System::RpcLayeredBincode
                | System::RpcBincode
                | System::RpcPostcard
                | System::RpcMsgPack
                | System::RpcLz4
                | System::RpcZstd
                | System::RpcTls
                | System::RpcProm
                | System::Baseline
        )
    }

    /// The body serializer of a framework system: the framework's default
    /// (postcard) unless the system names one.
    pub fn serializer(self) -> rpc::SerializerKind {
        match self {
            System::RpcBincode | System::RpcLayeredBincode => rpc::SerializerKind::Bincode,
            System::RpcPostcard => rpc::SerializerKind::Postcard,
            System::RpcMsgPack => rpc::SerializerKind::MsgPack,
            _ => rpc::SerializerKind::default(),
        }
    }

    /// Whether the system adds one counting layer on each side.
    pub fn is_layered(self) -> bool {
        matches!(self, System::RpcLayered | System::RpcLayeredBincode)
    }

    /// The body compression of a framework system: none unless the system
    /// names one.
    pub fn compression(self) -> rpc::Compression {
        match self {
            System::RpcLz4 => rpc::Compression::Lz4,
            System::RpcZstd => rpc::Compression::Zstd,
            _ => rpc::Compression::None,
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for System {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "rpc" => Ok(System::Rpc),
            "rpc-layered" => Ok(System::RpcLayered),
            "rpc-layered-bincode" => Ok(System::RpcLayeredBincode),
            "rpc-bincode" => Ok(System::RpcBincode),
            "rpc-postcard" => Ok(System::RpcPostcard),
            "rpc-msgpack" => Ok(System::RpcMsgPack),
            "rpc-lz4" => Ok(System::RpcLz4),
            "rpc-zstd" => Ok(System::RpcZstd),
            "rpc-tls" => Ok(System::RpcTls),
            "rpc-prom" => Ok(System::RpcProm),
            "tarpc" => Ok(System::Tarpc),
            "echo" => Ok(System::Echo),
            other => Err(format!(
                "unknown system `{other}` (expected rpc, rpc-layered, rpc-layered-bincode, rpc-bincode, rpc-postcard, rpc-msgpack, rpc-lz4, rpc-zstd, rpc-tls, rpc-prom, tarpc or echo)"
            )),
        }
    }
}

/// Formats an error with its `source()` chain (the framework's own
/// formatter, shared by every system here).
pub use rpc::error::report as chain;
