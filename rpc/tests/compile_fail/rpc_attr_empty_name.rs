#[rpc::service]
pub trait Users {
    #[rpc(name = "")]
    async fn get(&self, id: u64) -> u32;
    async fn other(&self) -> u32;
}

fn main() {}
