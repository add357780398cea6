//! `tcp`: the endpoint accepts a connection.
use super::{Check, CheckResult};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::time::Instant;

pub struct TcpCheck;

impl Check for TcpCheck {
    fn check(
        &self,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(async move { super::connect(addr, deadline).await.map(|_| None) })
    }
}
