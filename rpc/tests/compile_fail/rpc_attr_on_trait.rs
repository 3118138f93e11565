#[rpc::service]
#[rpc(version = "2.0")]
pub trait Users {
    async fn get(&self, id: u64) -> u32;
}

fn main() {}
