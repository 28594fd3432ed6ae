//! The adversarial suite: hostile agents, backends and neighbours against a real gateway
//! on loopback. Every case asserts the documented answer (docs/security.md), that the
//! process's memory stays bounded (RSS from /proc, a generous bound, never a timing),
//! and that a canary agent on the same gateway still receives its pushes.
//!
//! nextest runs each test in its own process, so the RSS read is this case's alone.

#[path = "../gateway/common.rs"]
mod common;
mod harness;

mod agents;
mod backends;
mod driver;
mod neighbours;
mod properties;
