//! `tcp`: the endpoint accepts a connection.
use super::{Check, CheckResult};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

pub struct TcpCheck;

impl Check for TcpCheck {
    fn check(&self, addr: SocketAddr) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(async move {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => Ok(None),
                Err(error) => Err(format!("connect: {error}")),
            }
        })
    }
}
