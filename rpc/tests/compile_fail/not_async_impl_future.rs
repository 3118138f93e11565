#[rpc::service]
pub trait Greeter {
    fn hello(&self, name: String) -> impl std::future::Future<Output = String> + Send;
}

fn main() {}
