#[rpc::service]
pub trait Geometry {
    async fn area(&self, (w, h): (u32, u32)) -> u32;
    async fn ignore(&self, _: u32);
    async fn rebind(&self, mut x: u32) -> u32;
}

fn main() {}
