use std::rc::Rc;

#[rpc::service]
pub trait Greeter {
    async fn hello(&self, name: String) -> String;
}

struct Impl;

impl Greeter for Impl {
    async fn hello(&self, name: String) -> String {
        let shared = Rc::new(name);
        std::future::ready(()).await;
        format!("hello, {shared}")
    }
}

fn main() {}
