//! Shared helpers for the end-to-end tests: they drive the real `legate` binary against real
//! servers on free loopback ports. A missing server binary is a test failure naming the
//! package to install, never a skip.
//!
//! One file per concern. `dns`, `tls` and `fault` are named in full (`common::tls::*`);
//! every name in the other files is re-exported here, so a test says `use common::*;` (those
//! files are private modules, so no module name shadows a crate such as `redis`):
//!
//! - [`process`]: free ports, [`Proc`], [`run_with_timeout`], polling with a deadline
//!   ([`eventually`] / [`wait_for`]; no bare sleeps for readiness).
//! - [`client`]: the client side of a connection ([`connect`], [`read_to_end`],
//!   [`closed_within`], ...) and test data ([`payload`], [`sha256_hex`]).
//! - [`http`]: one HTTP/1.1 request to the admin port, and the response parser.
//! - [`metrics`]: the Prometheus text parser behind [`Legate::metrics`].
//! - [`legate`]: [`LegateBuilder`] writes a config and starts `legate run -c FILE`; [`Legate`]
//!   is the running process (admin requests, signals, exit; its log printed if the test
//!   panics).
//! - [`redis_server`], [`mariadb`], [`backends`]: real backends ([`RedisServer`],
//!   [`MariaDb`], [`Socat`]), each killed and waited on drop, and [`TcpBackend`], a tiny
//!   in-test TCP server (echo, "say who I am", or any handler).
//! - [`tls`]: certificates made in the test, a TLS-only redis-server, `redis-cli --tls`.
//! - [`dns`]: a real `dnsmasq` answering from a hosts file.
//! - [`fault`]: the fault suite's shared end-of-test checker.
#![allow(dead_code)]

mod backends;
mod client;
mod http;
mod legate;
mod mariadb;
mod metrics;
mod process;
mod redis_server;

pub mod dns;
pub mod fault;
pub mod tls;

// A test binary uses only some of these files, so some re-exports go unused in each.
#[allow(unused_imports)]
pub use self::{
    backends::*, client::*, http::*, legate::*, mariadb::*, metrics::*, process::*, redis_server::*,
};
