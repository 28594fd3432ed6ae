//! `tether-operator` binary.
fn main() {}
