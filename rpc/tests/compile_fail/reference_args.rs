#[rpc::service]
pub trait Greeter {
    async fn hello(&self, name: &str) -> String;
    async fn sum(&self, values: &[u64]) -> u64;
    async fn nested(&self, names: Vec<&String>) -> usize;
    async fn name(&self) -> &'static str;
}

fn main() {}
