//! Fixed targets: an IP:port that never changes.
use super::{EndpointSpec, Endpoints};
use std::net::SocketAddr;

/// Publish a static address once; it never needs a refresh.
pub(crate) fn publish(endpoints: &Endpoints, target: &str, addr: SocketAddr) {
    endpoints.update(target, vec![EndpointSpec::plain(addr)]);
}
