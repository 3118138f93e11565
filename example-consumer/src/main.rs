//! Example consumer calling UserService

fn main() {}
