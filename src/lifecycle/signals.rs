//! Signals for the main loop: SIGTERM and SIGINT stop, SIGHUP reloads.

use super::StartError;
use tokio::signal::unix::{signal, Signal, SignalKind};

pub(super) enum Event {
    Stop(&'static str),
    Hangup,
}

pub(super) struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    pub(super) fn install() -> Result<Signals, StartError> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).map_err(StartError::Signals)?,
            interrupt: signal(SignalKind::interrupt()).map_err(StartError::Signals)?,
            hangup: signal(SignalKind::hangup()).map_err(StartError::Signals)?,
        })
    }

    pub(super) async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Event::Stop("SIGINT"),
            _ = self.hangup.recv() => Event::Hangup,
        }
    }

    /// The next SIGTERM or SIGINT; SIGHUPs meanwhile are ignored (we are draining).
    pub(super) async fn stop_requested(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Event::Stop(signal) => return signal,
                Event::Hangup => tracing::info!("SIGHUP ignored: draining"),
            }
        }
    }
}
