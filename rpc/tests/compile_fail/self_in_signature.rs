#[rpc::service]
pub trait Node {
    async fn parent(&self) -> Option<Box<Self>>;
}

fn main() {}
