#[rpc::service]
pub trait Factory {
    async fn new(&self, name: String) -> u64;
    async fn with(&self, name: String) -> u64;
}

fn main() {}
