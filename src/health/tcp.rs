//! `tcp`: the endpoint accepts a connection.
use super::{Check, CheckResult, Probe};
use std::future::Future;
use std::pin::Pin;
use tokio::time::Instant;

pub(crate) struct TcpCheck;

impl Check for TcpCheck {
    fn check(
        &self,
        target: Probe,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(async move { super::connect(&target, deadline).await.map(|_| None) })
    }
}
