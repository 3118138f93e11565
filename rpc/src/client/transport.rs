//! The transport layer: the picked instance's pooled, multiplexed connection.

use rpc_core::{CallPolicy, Compression, RpcError, SerializerKind};
use rpc_transport::RawReply;

use super::{Call, ClientContext};

/// Sends the attempt to the instance `LoadBalance` picked, with the time
/// left and the call's metadata, and waits for the reply.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    serializer: SerializerKind,
    compression: Compression,
    compression_threshold: usize,
}

impl Transport {
    /// Sends with `serializer` (the arguments are encoded with it),
    /// uncompressed.
    pub fn new(serializer: SerializerKind) -> Self {
        Self {
            serializer,
            compression: Compression::None,
            compression_threshold: usize::MAX,
        }
    }

    /// Sends as `policy` says: its serializer, and its compression for
    /// request bodies of at least `policy.compression_threshold` bytes.
    pub fn for_policy(policy: &CallPolicy) -> Self {
        Self {
            serializer: policy.serializer,
            compression: policy.compression,
            compression_threshold: policy.compression_threshold,
        }
    }
}

impl Call for Transport {
    async fn call(&self, cx: &mut ClientContext<'_>, args: &[u8]) -> Result<RawReply, RpcError> {
        let Some(instance) = cx.instance() else {
            return Err(RpcError::NoProvider {
                service: cx.service.to_owned(),
            });
        };
        let opts = rpc_transport::CallOptions {
            service: cx.service,
            method: cx.method.name,
            serializer: self.serializer,
            timeout: cx.remaining,
            metadata: &cx.metadata,
            compression: self.compression,
            compression_threshold: self.compression_threshold,
        };
        // From the attempt's start: the transport's latency sample and the
        // time sent to the server need no clock read of their own.
        instance
            .endpoint
            .call_raw_from(cx.attempt_start, &opts, args)
            .await
    }
}
