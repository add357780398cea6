//! Supervise mode, `legate run ... -- CMD [ARGS]`: legate and the application in one
//! container (plain `docker run`, Jobs, platforms without sidecars).
//!
//! [`App`] owns the application's process. It starts CMD (stdio inherited) the first
//! time `/ready` is 200, hands signals on to it, and reports its exit; the main loop in
//! `lifecycle` decides what that means. The order it gives a shutdown:
//!
//! 1. SIGTERM, SIGINT or `POST /quitquitquit` reach legate: the signal goes on to CMD
//!    (`/quitquitquit` as SIGTERM), `/ready` turns 503, and legate keeps proxying so the
//!    application can finish its work through it.
//! 2. CMD exits: legate stops accepting, drains open connections for `drain_timeout`
//!    (no `shutdown_delay`: the application it was waiting for is gone) and exits with
//!    CMD's exit code, or 128+N when CMD was killed by signal N.
//!
//! SIGHUP goes on to CMD and still reloads legate's configuration. A CMD that cannot be
//! started (not found, not executable) ends legate with exit code 127, like a shell.

use crate::state::Shared;
/// The signals [`App::forward`] passes on (`Signal::TERM`, `Signal::INT`, `Signal::HUP`).
pub(crate) use rustix::process::Signal;
use rustix::process::{kill_process, Pid};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

/// How often readiness is looked at before CMD starts. `Shared::readiness_changed` is a
/// `Notify` the readiness watcher consumes, so waiting on it here would steal its wakeups.
const READY_POLL: Duration = Duration::from_millis(50);

/// The exit code when CMD cannot be started, as `sh` and `env` use for "not found".
pub(crate) const CANNOT_START: i32 = 127;

/// What happened to the application.
#[derive(Debug)]
pub(crate) enum AppEvent {
    /// legate turned ready and CMD is running.
    Started,
    /// CMD could not be started; the message says why.
    CannotStart(String),
    /// CMD exited; the exit code legate should exit with.
    Exited(i32),
}

enum Phase {
    /// Waiting for `/ready` to turn 200 for the first time.
    WaitingForReady,
    Running(Child),
    Done,
}

/// The supervised application.
pub(crate) struct App {
    command: Vec<String>,
    phase: Phase,
}

impl App {
    /// `command` is CMD and its arguments; it must not be empty.
    pub(crate) fn new(command: Vec<String>) -> App {
        debug_assert!(!command.is_empty());
        App {
            command,
            phase: Phase::WaitingForReady,
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running(_))
    }

    /// The next thing that happens to the application. Cancel-safe: the main loop calls
    /// it again after handling a signal or a reload.
    pub(crate) async fn next(&mut self, shared: &Shared) -> AppEvent {
        match &mut self.phase {
            Phase::WaitingForReady => {
                while !is_ready(shared) {
                    tokio::time::sleep(READY_POLL).await;
                }
                self.start()
            }
            Phase::Running(child) => {
                let code = match child.wait().await {
                    Ok(status) => exit_code(status),
                    Err(error) => {
                        // Cannot happen for a child we spawned and still own; say so if it does.
                        tracing::error!(%error, "cannot wait for the supervised command");
                        1
                    }
                };
                self.phase = Phase::Done;
                AppEvent::Exited(code)
            }
            Phase::Done => std::future::pending().await,
        }
    }

    fn start(&mut self) -> AppEvent {
        // The CLI never passes an empty command; if it did, that is a command that cannot start.
        let Some((program, args)) = self.command.split_first() else {
            self.phase = Phase::Done;
            return AppEvent::CannotStart("no command to run after --".into());
        };
        match Command::new(program).args(args).spawn() {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                tracing::info!(command = %self.command.join(" "), pid, "ready: started the supervised command");
                self.phase = Phase::Running(child);
                AppEvent::Started
            }
            Err(error) => {
                self.phase = Phase::Done;
                AppEvent::CannotStart(format!("cannot run {program}: {error}"))
            }
        }
    }

    /// Hand `signal` on to the running application; nothing happens when it is not running.
    pub(crate) fn forward(&self, signal: Signal) {
        let Phase::Running(child) = &self.phase else {
            return;
        };
        // `id()` is None once the child was reaped; then there is no one to tell.
        let Some(pid) = child.id().and_then(|id| Pid::from_raw(id as i32)) else {
            return;
        };
        match kill_process(pid, signal) {
            Ok(()) => tracing::info!(
                ?signal,
                pid = pid.as_raw_nonzero().get(),
                "passed the signal on to the supervised command"
            ),
            // ESRCH: it exited a moment ago and `next` will report that.
            Err(error) => {
                tracing::warn!(?signal, %error, "cannot pass the signal on to the supervised command")
            }
        }
    }
}

fn is_ready(shared: &Shared) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    shared.started.load(Relaxed) || crate::admin::ready::reasons(shared).is_empty()
}

/// A shell's view of how a process ended: its exit code, or 128+N if signal N killed it.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
    }
}
