//! `peer-axum-tuned`: the same server with a 1 KiB read buffer, no write buffer and
//! mimalloc: the carefully tuned Rust baseline the gateway has to beat.

#[path = "peer.rs"]
mod peer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    peer::run(peer::Tuning {
        read_buffer: Some(1024),
        write_buffer: Some(0),
    })
    .await;
}
