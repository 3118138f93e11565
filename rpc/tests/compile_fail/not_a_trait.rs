#[rpc::service]
pub struct Greeter;

fn main() {}
