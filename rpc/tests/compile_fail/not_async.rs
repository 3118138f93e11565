#[rpc::service]
pub trait Greeter {
    fn hello(&self, name: String) -> String;
}

fn main() {}
