//! Example provider serving UserService

fn main() {}
