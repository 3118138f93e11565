#[rpc::service]
pub trait Greeter {
    #[cfg(feature = "loud")]
    async fn shout(&self, name: String) -> String;
}

fn main() {}
