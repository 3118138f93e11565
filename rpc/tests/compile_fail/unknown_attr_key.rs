#[rpc::service(version = "1.0", timeout = "3s")]
pub trait Greeter {
    async fn hello(&self, name: String) -> String;
}

fn main() {}
