#[rpc::service]
pub trait Greeter {
    async fn hello(&self, name: impl Into<String>) -> String;
}

fn main() {}
