//! Store health: whether the store answers metadata requests, so that lookups and listings stop
//! waiting on one that does not. Touches nothing but its own state and one probe of the store.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::FsError;
use crate::store::{ErrorKind, SharedStore, StoreExt};

/// How long after the store failed to answer lookups and listings stop asking it; then one
/// request in the background looks again (and the uploader's first success ends it early).
const STORE_DOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a lookup or listing waits for the store before answering from what the mount knows.
pub(super) const METADATA_BUDGET: Duration = Duration::from_secs(10);

/// Whether an error means the store cannot be reached right now (so local answers may do).
pub(super) fn unreachable(err: &FsError) -> bool {
    matches!(err, FsError::Store(e) if e.kind().is_retryable())
}

/// Whether an error means the store did not answer in time (an error it answered with, a 500
/// say, shows it is there).
pub(super) fn timed_out(err: &FsError) -> bool {
    matches!(err, FsError::Store(e) if e.kind() == ErrorKind::Timeout)
}

/// What a lookup or listing gets when the store does not answer in time, or did not a moment
/// ago.
pub(super) fn store_down() -> crate::store::StoreError {
    crate::store::StoreError::new(
        ErrorKind::Timeout,
        "the store does not answer; answering from what this mount knows",
    )
}

/// Whether the store answers metadata requests: set when one did not answer in time, so that
/// lookups and listings answer from what the mount knows instead of each waiting out its own
/// timeout. Owns its one lock (a leaf: nothing is locked while it is held).
#[derive(Debug, Default)]
pub(super) struct StoreHealth {
    /// Until when lookups and listings do not ask the store.
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl StoreHealth {
    fn until(&self) -> MutexGuard<'_, Option<Instant>> {
        self.down_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the store failed to answer lately. Once [`STORE_DOWN_GRACE`] has passed, a
    /// request to `store` in the background looks again, and until it succeeds the answer stays
    /// yes: no lookup or listing waits on a store that is known not to answer.
    pub(super) fn seems_down(&self, store: &SharedStore) -> bool {
        let mut until = self.until();
        match *until {
            None => false,
            Some(at) if Instant::now() < at => true,
            Some(_) => {
                *until = Some(Instant::now() + STORE_DOWN_GRACE);
                let (store, down) = (Arc::clone(store), Arc::clone(&self.down_until));
                tokio::spawn(async move {
                    // Any answer, "no such key" included, means the store is back.
                    if store.head_opt(".cairn/alive").await.is_ok() {
                        *down.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                });
                true
            }
        }
    }

    /// Notes whether a metadata request reached the store.
    pub(super) fn note_reached(&self, reached: bool) {
        *self.until() = if reached {
            None
        } else {
            Some(Instant::now() + STORE_DOWN_GRACE)
        };
    }

    /// The store answered: ask it again from now on.
    pub(super) fn answered(&self) {
        *self.until() = None;
    }
}
