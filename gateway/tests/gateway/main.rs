//! Integration tests of the gateway: a real process-local gateway on loopback, driven by
//! real WebSocket and HTTP clients. One binary (links once), one module per area.

mod common;

mod drain;
mod handshake;
mod limits;
mod push;
mod refusals;
mod upstream;
