#[rpc::service]
pub trait Store {
    async fn put<T>(&self, value: T);
    async fn get<'a>(&self, key: String) -> String;
    async fn fixed<const N: usize>(&self, key: String) -> String;
    async fn bounded(&self, key: String) -> String
    where
        String: Clone;
}

fn main() {}
