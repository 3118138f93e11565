#[rpc::service]
pub trait Users {
    #[rpc(timeout_ms = 0)]
    async fn get(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
