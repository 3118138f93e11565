//! Side-by-side benchmark: this framework, tarpc, and a bare framed echo

fn main() {}
