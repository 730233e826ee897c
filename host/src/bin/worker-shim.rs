//! The generic worker process (issue 3).
fn main() {}
