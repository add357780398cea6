//! legate: an ambassador sidecar — a small L4 (TCP and TLS) proxy that runs beside an
//! application so the application talks to `localhost` while legate finds, checks and
//! follows the real backends.
//!
//! # Layout
//! Data flows one way: config → discovery → endpoint set (published with arc-swap) →
//! balancer → connection forwarding. The admin server and metrics read the same shared
//! state.
//!
//! - `cli`: the command line (run, check, wait, version) and quick-mode pairing.
//! - `config`: the TOML file and flags, validated into runtime types.
//! - `discovery`: endpoints, endpoint sets, and the sources that fill them.
//! - `balance`: picking an endpoint (round-robin, least-conn, random, first).
//! - `health`: active checks with rise/fall thresholds.
//! - `proxy`: accept loop, connect with failover, forwarding (splice on Linux).
//! - `tls`: rustls origination and termination, certificate loading and reload, and the
//!   handshakes of a proxied connection with their metrics.
//! - `admin`: the admin HTTP server (/ready, /startup, /live, /metrics, /endpoints).
//! - `metrics`: the Prometheus registry and metric names.
//! - `state`: the shared state the data plane and admin read.
//! - `lifecycle`: start (fresh or adopted sockets), signals, reload, drain, handover to a
//!   new process, SidecarSet roles, and supervise mode (`legate run ... -- CMD`).
//! - `wait`: `legate wait`.
//! - `logging`: log setup and rate limits.
//! - `watch`: watching a file through every way it gets replaced.
//! - `clock`: the process's monotonic millisecond clock.
//!
//! `fuzzing` (hidden) is the fuzz targets' door to the private parsers.
//!
//! Public is only what the binary, the tests and the fuzz targets use: `cli`, `config`,
//! `discovery::endpoint_file`, `lifecycle::{Source, run}`, `logging::init`,
//! `metrics::install_panic_hook`, `wait` and `fuzzing`. Everything else is `pub(crate)`, so
//! the compiler points at dead code.
//
// Unsafe code: only `proxy::splice` may use it (two syscalls). `forbid` cannot be relaxed by
// an inner `allow`, so it cannot sit at this root above splice.rs's `#![allow(unsafe_code)]`;
// instead every module but `proxy` is declared `forbid` here, and `proxy/mod.rs` does the same
// for each of its modules but `splice`. The root `deny` covers what is left: this file and
// proxy/mod.rs themselves. Each `unsafe` block needs a `// SAFETY:` comment (clippy).
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
// A panic takes down a connection or a background task: outside tests, errors are values
// and impossible cases are argued for where they are allowed (`#[allow(..., reason)]`).
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[forbid(unsafe_code)]
mod admin;
#[forbid(unsafe_code)]
mod balance;
#[forbid(unsafe_code)]
pub mod cli;
#[forbid(unsafe_code)]
mod clock;
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod discovery;
#[doc(hidden)]
#[forbid(unsafe_code)]
pub mod fuzzing;
#[forbid(unsafe_code)]
mod health;
#[forbid(unsafe_code)]
pub mod lifecycle;
#[forbid(unsafe_code)]
pub mod logging;
#[forbid(unsafe_code)]
pub mod metrics;
mod proxy;
#[forbid(unsafe_code)]
mod state;
#[forbid(unsafe_code)]
mod tls;
#[forbid(unsafe_code)]
pub mod wait;
#[forbid(unsafe_code)]
mod watch;
