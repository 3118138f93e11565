#[rpc::service(name = "greeter:v1")]
pub trait Greeter {
    async fn hello(&self, name: String) -> String;
}

fn main() {}
