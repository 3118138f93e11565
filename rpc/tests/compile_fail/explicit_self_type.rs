#[rpc::service]
pub trait Greeter {
    async fn hello(self: std::sync::Arc<Self>, name: String) -> String;
}

fn main() {}
