//! Integration tests of the gateway: a real process-local gateway on loopback, driven by
//! real WebSocket and HTTP clients. One binary (links once), one module per area.

mod common;

mod connect_check;
mod drain;
mod fanout;
mod handshake;
mod jwks;
mod limits;
mod push;
mod quotas;
mod refusals;
mod revocation;
mod upstream;
