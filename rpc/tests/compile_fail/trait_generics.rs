#[rpc::service]
pub trait Store<T> {
    async fn get(&self, key: String) -> String;
}

fn main() {}
