#[rpc::service]
pub trait Users {
    #[rpc(timeout_ms = "5")]
    async fn get(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
