#[rpc::service]
pub trait Users {
    #[rpc]
    async fn get(&self, id: u64) -> u32;
    #[rpc = "idempotent"]
    async fn put(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
