//! `peer-axum`: axum + tokio-tungstenite with every default (the naive-Rust baseline).

#[path = "peer.rs"]
mod peer;

#[tokio::main]
async fn main() {
    peer::run(peer::Tuning::default()).await;
}
