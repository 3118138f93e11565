#[rpc::service(version = "1.0", version = "2.0")]
pub trait Greeter {
    async fn hello(&self, name: String) -> String;
}

fn main() {}
