#[rpc::service]
pub trait Users {
    #[rpc(idempotnet)]
    async fn get(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
