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
//! - `tls`: rustls origination and termination, certificate loading and reload.
//! - `admin`: the admin HTTP server (/ready, /startup, /live, /metrics, /endpoints).
//! - `metrics`: the Prometheus registry and metric names.
//! - `state`: the shared state the data plane and admin read.
//! - `lifecycle`: start-up, signals, drain and exit.
//! - `supervise`: `legate run ... -- CMD`, the app started once ready, signals passed on.
//! - `wait`: `legate wait`.
//! - `logging`: log setup and rate limits.
//! - `watch`: watching a file through every way it gets replaced.
//!
//! `fuzzing` (hidden) is the fuzz targets' door to the private parsers.
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod supervise;
pub mod tls;
pub mod wait;
pub mod watch;
