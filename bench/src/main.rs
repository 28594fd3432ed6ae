//! `tether-bench`: see the library docs and `docs/benchmarks.md`.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tether_bench::main_with(tether_bench::Args::parse()).await
}
