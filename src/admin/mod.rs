//! The admin HTTP server: readiness, liveness, metrics and endpoints, on its own port
//! outside the data plane's limits.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /ready` | 200 `ready`, or 503 with one reason per line |
//! | `GET /startup` | 200 once ready at least once, else 503 |
//! | `GET /live` | 200 while the process serves |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /endpoints` | JSON: listeners, targets, endpoints, health, open connections |
//! | `POST /quitquitquit` | graceful shutdown |

pub(crate) mod endpoints;
pub(crate) mod ready;
pub(crate) mod server;
