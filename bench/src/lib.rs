//! `tether-bench`: a load generator that runs Tether and peer WebSocket servers side by
//! side under the same load and prints one table per run (optionally JSON).
//!
//! ```text
//!   tether-bench (coordinator)
//!     ├─ starts target shards ──────────► tether-gateway ×S | peer-axum ×S | node ws ×S | ...
//!     ├─ spawns workers (same binary) ──► worker ×P: ≤19k sockets each, sources 127.<10+p>.x.y
//!     │      (`million`: lean-worker ×P, one mio loop, a 64-byte slot per connection)
//!     │      stdin: Job, Cmd lines         stdout: Event lines (histograms as HdrHistogram V2)
//!     ├─ reads /proc/<pid>/status, /proc/<pid>/stat, /proc/net/sockstat around each phase
//!     └─ drives the push API over HTTP (push / request / broadcast) or orders a churn
//! ```
//!
//! Modules: [`target`] starts servers, [`worker`] and [`lean`] hold connections, [`stats`] measures,
//! [`run`] orchestrates one mode over every target and [`report`] prints the table.

pub mod children;
pub mod lean;
pub mod pusher;
pub mod report;
pub mod run;
pub mod stats;
pub mod target;
pub mod worker;

pub use run::{Args, Mode, main_with};
