#[rpc::service]
pub trait Greeter {
    const GREETING: &'static str;
    type Output;
    async fn hello(&self, name: String) -> String;
}

fn main() {}
