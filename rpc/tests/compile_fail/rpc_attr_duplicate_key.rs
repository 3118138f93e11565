#[rpc::service]
pub trait Users {
    #[rpc(idempotent, timeout_ms = 5)]
    #[rpc(timeout_ms = 6)]
    async fn get(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
