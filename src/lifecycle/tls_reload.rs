//! TLS reload: a listener's certificates, keys and CAs are re-read whenever one of their
//! files changes (in place, by rename, or by a ConfigMap `..data` swap); new handshakes use
//! the new material, open connections keep theirs. A bad set keeps the previous one.

use crate::state::{ListenerState, Shared};
use crate::tls;
use crate::watch::{FileWatch, LastContents, LastProblem};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Backstop re-read of certificate files.
const POLL: Duration = Duration::from_secs(2);

/// Reload `listener`'s TLS material whenever one of its files changes, until cancelled.
pub(super) async fn follow(
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let config = listener.config.load_full();
    let paths = tls::files(&config);
    if paths.is_empty() {
        return;
    }
    let mut watches: Vec<FileWatch> = paths.iter().map(|p| FileWatch::new(p, POLL)).collect();
    let read = || -> Vec<Option<Vec<u8>>> { paths.iter().map(|p| std::fs::read(p).ok()).collect() };
    let mut contents = LastContents::new(Some(read()));
    let mut problem = LastProblem::default();
    loop {
        let changed = futures_any(&mut watches);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = changed => {}
        }
        if !contents.changed(read()) {
            continue;
        }
        let config = listener.config.load_full();
        match listener.tls.rebuild(&config) {
            Ok(expiries) => {
                tls::publish_expiries(&shared.metrics, &listener.name, &expiries);
                shared.metrics.reload("tls", true);
                problem.clear();
                tracing::info!(listener = %listener.name, "TLS material reloaded; new handshakes use it");
            }
            Err(error) => {
                let message = error.to_string();
                // A cert and key written one after the other pass through a mismatched
                // state; count it, but log a persisting problem once.
                shared.metrics.reload("tls", false);
                if problem.is_new(&message) {
                    tracing::warn!(listener = %listener.name, %error, "TLS material refused; keeping the previous certificates");
                }
            }
        }
    }
}

/// Resolves when any of the watches fires.
async fn futures_any(watches: &mut [FileWatch]) {
    let mut pending: Vec<_> = watches.iter_mut().map(|w| Box::pin(w.changed())).collect();
    std::future::poll_fn(|cx| {
        for future in pending.iter_mut() {
            if std::future::Future::poll(future.as_mut(), cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}
