//! The uploader: applies the change log to the store in the background, in order, several
//! changes at once where they touch unrelated keys. A file's contents are uploaded from its cache
//! file itself while the file is marked as uploading: a write meanwhile first moves the file to a
//! copy of its own (copy on write), so the object is always a version the file really had, even
//! while the application goes on writing, and a file no one writes during its upload is never
//! copied. A file the mount holds no state for (after a restart) is uploaded from a snapshot.
//! Retryable store errors are retried with backoff for as long as it takes; the changes wait
//! safely on local disk meanwhile.
//!
//! Also here: waiting for changes to reach the store (fsync, flush, unmount), the figures a
//! report shows, and the periodic work (uploading files kept open and written, evicting clean
//! cached data beyond the cache size).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::attrs::Kind;
use crate::fs::Filesystem;
use crate::store::ETag;

mod apply;
mod plan;
mod put;
mod settle;
mod wait;

/// The longest the uploader waits between requests to a store that does not answer.
pub(super) const STORE_PAUSE_CEILING: Duration = Duration::from_secs(30);

/// The most deletes one request applies (S3's limit for DeleteObjects).
const DELETE_BATCH: usize = 1000;

/// How the uploader is doing, for reports and `cairn flush`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last failure to apply a change, and when.
    pub last_error: Option<(SystemTime, String)>,
    /// Whether the last attempt failed (cleared by the next success).
    pub failing: bool,
    /// Whether that failure was one that retrying will not fix by itself (access denied,
    /// bucket gone): it needs an operator.
    pub permanent: bool,
    pub applied_changes: u64,
    pub uploaded_bytes: u64,
    /// Requests in a row the store failed to answer (timeouts, refusals, 5xx), counted once per
    /// pause; and until when the uploader waits before its next request (see `pace`).
    store_failures: u32,
    paused_until: Option<Instant>,
}

/// What is not yet in the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending {
    pub changes: usize,
    /// Bytes of file contents waiting for upload.
    pub bytes: u64,
    /// When the oldest waiting change was made due.
    pub oldest: Option<SystemTime>,
}

/// What applying a change came to.
pub(super) enum Applied {
    Done {
        bytes: u64,
        /// What the store now holds at the key, for the inode there.
        stored: Option<(Kind, ETag, u64)>,
    },
    /// Nothing to apply any more (its file or source is gone); said why.
    Dropped(String),
}

/// The uploader's own state: how it is doing, its failed attempts, and whether (and until when)
/// it may write to the store. Each lock here is a leaf: nothing else is locked while one is held.
#[derive(Debug, Default)]
pub(super) struct UploadState {
    status: Mutex<Status>,
    /// Failed attempts per pending change, for backoff.
    attempts: Mutex<HashMap<u64, u32>>,
    /// Set when this mount may no longer write to the store (its lease was taken over): why.
    fenced: Mutex<Option<String>>,
    /// With a lease: until when the last renewal lets this mount write to the store.
    until: Mutex<Option<Instant>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl UploadState {
    pub(super) fn status(&self) -> MutexGuard<'_, Status> {
        locked(&self.status)
    }

    pub(super) fn attempts(&self) -> MutexGuard<'_, HashMap<u64, u32>> {
        locked(&self.attempts)
    }

    fn fence(&self, why: String) {
        {
            let mut status = self.status();
            status.last_error = Some((SystemTime::now(), why.clone()));
            status.failing = true;
            status.permanent = true;
        }
        *locked(&self.fenced) = Some(why);
    }

    fn allow_until(&self, deadline: Instant) {
        *locked(&self.until) = Some(deadline);
    }

    pub(super) fn fenced(&self) -> Option<String> {
        locked(&self.fenced).clone()
    }

    /// Not fenced, and within the lease's last renewal (if there is a lease).
    pub(in crate::fs) fn may_upload(&self) -> bool {
        let until = *locked(&self.until);
        self.fenced().is_none() && until.is_none_or(|until| Instant::now() < until)
    }
}

impl Filesystem {
    /// Starts applying the change log in the background (on the current tokio runtime).
    pub fn start_uploader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let fs = Arc::clone(self);
        tokio::spawn(async move { fs.run_uploader().await })
    }

    async fn run_uploader(self: Arc<Self>) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut last_tick = Instant::now();
        loop {
            // While the store is failing, one change at a time probes it: no point in eight
            // snapshots and eight failures at once.
            let failing = self.uploads.status().failing;
            let limit = if failing {
                1
            } else {
                self.config.uploads_in_flight
            };
            let room = limit.saturating_sub(in_flight.load(Ordering::Acquire));
            let paused_until = self
                .uploads
                .status()
                .paused_until
                .filter(|t| *t > Instant::now());
            let (mut batch, mut deletes) = (Vec::new(), Vec::new());
            if room > 0 && paused_until.is_none() && self.uploads.may_upload() {
                let now = SystemTime::now();
                let mut journal = self.change_log();
                // Deletes due together go in one request (an `rm -r` records hundreds at once).
                let most = if failing { 1 } else { DELETE_BATCH };
                deletes = journal.take_runnable_deletes(now, most);
                let room = room - usize::from(!deletes.is_empty());
                batch = journal.take_runnable(now, room);
            }
            if deletes.len() == 1 {
                batch.append(&mut deletes);
            }
            if !deletes.is_empty() {
                let fs = Arc::clone(&self);
                self.spawn_counted(&in_flight, async move { fs.apply_deletes(deletes).await });
            }
            for entry in batch {
                let fs = Arc::clone(&self);
                self.spawn_counted(&in_flight, async move {
                    let outcome = fs.apply(&entry).await;
                    fs.pace(outcome.as_ref().err());
                    fs.settle(entry, outcome).await;
                });
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                if let Err(err) = self.tick().await {
                    tracing::warn!("cache upkeep: {err}");
                }
            }
            let until_due = self
                .change_log()
                .next_due()
                .and_then(|due| due.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1));
            let until_due = paused_until.map_or(until_due, |t| t - Instant::now());
            let wait = until_due.clamp(Duration::from_millis(5), Duration::from_secs(1));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs `work` as one of the uploader's requests in flight, and wakes the uploader after.
    fn spawn_counted(
        self: &Arc<Self>,
        in_flight: &Arc<AtomicUsize>,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        in_flight.fetch_add(1, Ordering::AcqRel);
        let (fs, counter) = (Arc::clone(self), Arc::clone(in_flight));
        tokio::spawn(async move {
            work.await;
            counter.fetch_sub(1, Ordering::AcqRel);
            fs.wake.notify_one();
        });
    }

    /// Stops every write to the store for good (the lease was taken over): pending changes stay
    /// in the cache, writes fail with EROFS, and waits for uploads fail with `why`.
    pub fn fence(&self, why: String) {
        tracing::error!("{why}: no more uploads from this mount; its changes stay in the cache");
        self.uploads.fence(why);
        self.progress.notify_waiters();
        self.wake.notify_one();
    }

    /// With a lease: lets the uploader write to the store until `deadline` (the lease's expiry
    /// as of its last renewal, less a margin). Past it, uploads wait for the next renewal, so a
    /// mount that stalled past its lease writes nothing before it learns whether it lost it.
    pub fn allow_uploads_until(&self, deadline: Instant) {
        self.uploads.allow_until(deadline);
        self.wake.notify_one();
    }

    /// Why this mount may no longer write to the store, if so.
    pub fn fenced(&self) -> Option<String> {
        self.uploads.fenced()
    }

    /// How the uploader is doing.
    pub fn upload_status(&self) -> Status {
        self.uploads.status().clone()
    }

    /// What is not yet in the store, with the changed bytes counted anew.
    pub async fn pending_now(&self) -> Pending {
        self.refresh_dirty_bytes().await;
        self.pending()
    }

    /// What is not yet in the store (changed bytes as of the uploader's last count, at most a
    /// second ago).
    pub fn pending(&self) -> Pending {
        let journal = self.change_log();
        Pending {
            changes: journal.len(),
            bytes: self.upkeep.dirty_bytes(),
            oldest: journal.entries().map(|e| e.not_before).min(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{ErrorKind, StoreError};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::cache::Cache;
    use crate::fs::{Filesystem, FsConfig};
    use crate::namespace::ROOT;
    use crate::store::StoreExt;
    use crate::store::memory::MemoryStore;

    /// Creates files `f0`, `f1`... in the root, each holding "x", and closes them.
    async fn write_files(fs: &Filesystem, count: usize) {
        let flags = libc::O_WRONLY | libc::O_CREAT;
        for n in 0..count {
            let name = format!("f{n}");
            let (_, opened) = fs
                .create(ROOT, name.as_ref(), 0o644, 0o022, flags, 0, 0)
                .await
                .unwrap();
            fs.write(opened.fh, 0, b"x").await.unwrap();
            fs.release(opened.fh).await.unwrap();
        }
    }

    /// While the store does not answer, the uploader sends one request at a time, spaced out,
    /// not one for each of the 50 waiting changes; everything lands once it answers again.
    #[tokio::test]
    async fn a_store_that_does_not_answer_gets_requests_spaced_out() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let away = StoreError::new(ErrorKind::Unavailable, "connection refused");
        faulty.fail_next(Some(Op::Put), 10_000, away);
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = crate::fs::test_mount(faulty.clone(), config);
        fs.start_uploader();
        write_files(&fs, 50).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tried = faulty.calls(Op::Put);
        // The first requests in flight, then one at 0.4 s and one at 1.2 s.
        assert!(tried <= 12, "{tried} PUTs in 1.5 s to a store that is away");

        faulty.clear();
        fs.drain(Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(memory.list_all("", false).await.unwrap().objects.len(), 50);
    }

    /// Deletes due together (an `rm -r`) reach the store in one request, not one each.
    #[tokio::test]
    async fn deletes_due_together_go_in_one_request() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let cache = Cache::open(cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(faulty.clone(), cache, config).unwrap());
        fs.start_uploader();
        write_files(&fs, 50).await;
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!(memory.list_all("", false).await.unwrap().objects.len(), 50);

        // Held back while the files are removed, as a busy uploader would be.
        fs.allow_uploads_until(Instant::now());
        for n in 0..50 {
            fs.unlink(ROOT, format!("f{n}").as_ref()).await.unwrap();
        }
        fs.allow_uploads_until(Instant::now() + Duration::from_secs(60));
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert!(memory.list_all("", false).await.unwrap().objects.is_empty());
        assert_eq!(faulty.calls(Op::Delete), 0);
        assert_eq!(faulty.calls(Op::DeleteMany), 1);
    }
}
