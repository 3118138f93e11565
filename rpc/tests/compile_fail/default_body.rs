#[rpc::service]
pub trait Greeter {
    async fn hello(&self, name: String) -> String {
        format!("hello, {name}")
    }
}

fn main() {}
