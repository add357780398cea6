//! Watching one file the way real systems replace it.
//!
//! A file may be rewritten in place, replaced by a rename, deleted and recreated, or
//! swapped the way Kubernetes swaps a ConfigMap volume: the visible file is a symlink
//! through `..data`, and `..data` itself is atomically re-pointed at a new directory, so
//! the file's own inode never sees an event. So the *directory* is watched and any
//! event in it (other than reads) means "look again"; the reader compares contents and
//! applies only real changes. The notify callback only forwards a wake-up into a
//! one-slot channel, which coalesces bursts. A periodic re-read backs the watcher up
//! where events are lost (and covers a directory that does not exist yet).
//!
//! The reader's side: `LastContents` says whether a re-read found anything new, and
//! `LastProblem` lets a problem that persists across re-reads be logged once.

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Bursts of events closer than this are read once.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A file that keeps changing is still read at least this often.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

pub(crate) struct FileWatch {
    path: PathBuf,
    directory: PathBuf,
    watcher: Option<RecommendedWatcher>,
    /// Identity of the directory the watch is on, to notice it being replaced.
    watched_inode: Option<(u64, u64)>,
    /// The directories the current watcher covers.
    watched: Vec<PathBuf>,
    wake_tx: mpsc::Sender<()>,
    wake_rx: mpsc::Receiver<()>,
    poll: Duration,
}

impl FileWatch {
    /// Watch `path`; `poll` is the backstop re-read period.
    pub(crate) fn new(path: &Path, poll: Duration) -> FileWatch {
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let mut watch = FileWatch {
            path: path.to_path_buf(),
            directory,
            watcher: None,
            watched_inode: None,
            watched: Vec::new(),
            wake_tx,
            wake_rx,
            poll,
        };
        watch.arm();
        watch
    }

    /// The directories to watch: the file's own, and — when the file is a symlink —
    /// the directory of what it points to now (so an in-place edit of the target is
    /// seen too; after a `..data` swap that directory changes, hence re-arming).
    fn wanted(&self) -> Vec<PathBuf> {
        let mut wanted = vec![self.directory.clone()];
        if let Some(target_dir) = std::fs::canonicalize(&self.path)
            .ok()
            .and_then(|real| real.parent().map(Path::to_path_buf))
        {
            let own = std::fs::canonicalize(&self.directory).ok();
            if own.as_ref() != Some(&target_dir) {
                wanted.push(target_dir);
            }
        }
        wanted
    }

    /// (Re-)start watching; false while the directory does not exist.
    fn arm(&mut self) -> bool {
        let wanted = self.wanted();
        if self.watcher.is_some() && wanted == self.watched {
            return true;
        }
        self.watcher = None;
        let wake = self.wake_tx.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let relevant = match event {
                Ok(event) => !matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Open(_))
                        | EventKind::Access(AccessKind::Read)
                        | EventKind::Access(AccessKind::Close(AccessMode::Read))
                        | EventKind::Access(AccessKind::Close(AccessMode::Execute))
                        | EventKind::Access(AccessKind::Close(AccessMode::Any))
                ),
                // An overflowed queue means events were lost: look again.
                Err(_) => true,
            };
            if relevant {
                // Full means a wake-up is already pending; that one will do.
                let _ = wake.try_send(());
            }
        };
        let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
            watcher.watch(&self.directory, RecursiveMode::NonRecursive)?;
            // The symlink's target directory is best effort: under a burst of `..data`
            // swaps it may already be deleted. The directory's own watch sees the swap,
            // and the next wake-up re-arms on the new target.
            for directory in &wanted[1..] {
                if let Err(error) = watcher.watch(directory, RecursiveMode::NonRecursive) {
                    tracing::debug!(directory = %directory.display(), %error, "cannot watch the symlink's target directory");
                }
            }
            Ok(watcher)
        });
        match watcher {
            Ok(watcher) => {
                self.watcher = Some(watcher);
                self.watched_inode = inode(&self.directory);
                self.watched = wanted;
                true
            }
            Err(error) => {
                tracing::debug!(directory = %self.directory.display(), %error, "cannot watch directory yet");
                false
            }
        }
    }

    /// Wait until the file may have changed (an event, or the poll period passed).
    pub(crate) async fn changed(&mut self) {
        // Without a watch (the directory does not exist yet: a volume not mounted yet)
        // only polling can notice the file, so poll at least every second meanwhile.
        let poll = if self.watcher.is_some() {
            self.poll
        } else {
            self.poll.min(Duration::from_secs(1))
        };
        tokio::select! {
            _ = self.wake_rx.recv() => {
                // Let the writer finish: wait for DEBOUNCE without events (a slow
                // in-place writer must not be read half-way), but no longer than
                // MAX_DEBOUNCE, so a file rewritten nonstop is still followed.
                let started = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut quiet = true;
                    while self.wake_rx.try_recv().is_ok() {
                        quiet = false;
                    }
                    if quiet || started.elapsed() >= MAX_DEBOUNCE {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep(poll) => {
                // The directory may have been replaced (`mv dir dir.old && mkdir dir`):
                // a watch on the old inode would never fire again, so re-arm.
                if !self.directory.exists() || self.directory_replaced() {
                    self.watcher = None;
                }
            }
        }
        self.arm();
    }

    fn directory_replaced(&self) -> bool {
        self.watcher.is_some() && inode(&self.directory) != self.watched_inode
    }
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Read at most `cap` bytes of `path`; `Ok(None)` when it is larger than `cap`.
pub(crate) fn read_capped(path: &Path, cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut buffer = Vec::new();
    file.take(cap as u64 + 1).read_to_end(&mut buffer)?;
    Ok((buffer.len() <= cap).then_some(buffer))
}

/// What a watched file held when it was last acted on (applied, or refused), so a re-read
/// that finds the same contents does nothing: a wake-up only says "look again". `T` is
/// one file's bytes, or the bytes of several files read together.
#[derive(Debug)]
pub(crate) struct LastContents<T> {
    last: Option<T>,
}

impl<T: PartialEq> LastContents<T> {
    /// Start from `initial`, the contents already in use (`None`: nothing yet).
    pub(crate) fn new(initial: Option<T>) -> LastContents<T> {
        LastContents { last: initial }
    }

    /// `now` is what was last acted on.
    pub(crate) fn is(&self, now: &T) -> bool {
        self.last.as_ref() == Some(now)
    }

    /// Remember `now` as acted on; `None` forgets, so whatever is read next is new.
    pub(crate) fn set(&mut self, now: Option<T>) {
        self.last = now;
    }

    /// Remember `now` when it differs from what was last acted on; true when it did.
    pub(crate) fn changed(&mut self, now: T) -> bool {
        if self.is(&now) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

impl<T> Default for LastContents<T> {
    fn default() -> Self {
        LastContents { last: None }
    }
}

/// The problem last reported about a file, so one that persists across re-reads is logged
/// once, while a different one, or the same one after a good read, is logged again.
#[derive(Debug, Default)]
pub(crate) struct LastProblem {
    last: Option<String>,
}

impl LastProblem {
    /// Note `message`; true when it is not the problem last noted, so it should be logged.
    pub(crate) fn is_new(&mut self, message: &str) -> bool {
        if self.last.as_deref() == Some(message) {
            return false;
        }
        self.last = Some(message.to_string());
        true
    }

    /// The file was good: the next problem is new whatever it says.
    pub(crate) fn clear(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_change_only_when_the_bytes_do() {
        let mut contents = LastContents::new(Some(b"a".to_vec()));
        assert!(contents.is(&b"a".to_vec()));
        assert!(!contents.changed(b"a".to_vec()));
        assert!(contents.changed(b"b".to_vec()));
        assert!(!contents.changed(b"b".to_vec()));
        contents.set(None);
        assert!(
            contents.changed(b"b".to_vec()),
            "forgotten: the same bytes are new"
        );
        assert!(LastContents::default().changed(Vec::<u8>::new()));
    }

    #[test]
    fn a_problem_is_new_once_until_it_changes_or_clears() {
        let mut problem = LastProblem::default();
        assert!(problem.is_new("x: bad line 3"));
        assert!(!problem.is_new("x: bad line 3"));
        assert!(problem.is_new("x: bad line 4"));
        problem.clear();
        assert!(problem.is_new("x: bad line 4"));
    }
}
