//! Exclusive leases: the one host that may write a volume holds a small record in the store
//! (`.cairn/leases/VOLUME` at the store root), taken with a conditional put, renewed while
//! mounted, and deleted after the unmount has uploaded everything. Another host may take it only
//! once it has expired, again with a conditional put, so two takers cannot both win.
//!
//! Expiry compares the holder's wall clock (it writes `expires`) with the taker's: hosts are
//! expected to keep time (NTP); the TTL should be well above their possible skew.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::{ETag, ErrorKind, PutCondition, PutOptions, SharedStore, StoreError, StoreExt};

/// This host's name in leases when the config names none: its hostname.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Where a volume's lease lives at the store root.
pub fn lease_key(volume: &str) -> String {
    format!(".cairn/leases/{volume}")
}

/// What the store holds for a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holding host's id.
    pub host: String,
    /// Tells this holding apart from an earlier or later one of the same host.
    pub token: String,
    /// Unix seconds.
    pub acquired: u64,
    pub expires: u64,
}

impl LeaseRecord {
    pub fn is_live(&self) -> bool {
        self.expires > unix_now()
    }

    /// "host B since 2026-11-23T17:00:00Z, until 17:00:30Z".
    pub fn describe(&self) -> String {
        format!(
            "host {} (since {}, expires {})",
            self.host,
            rfc3339(self.acquired),
            rfc3339(self.expires)
        )
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "the volume is in use by {}: stop its container there (or, if that host is gone, wait \
         until the lease expires)",
        .0.describe()
    )]
    Held(LeaseRecord),
    #[error("this host's lease was taken over{}", .0.as_ref().map(|r| format!(" by {}", r.describe())).unwrap_or_default())]
    Lost(Option<LeaseRecord>),
    #[error(
        "the lease record {key} is damaged ({why}); delete it from the store once no host uses the volume"
    )]
    Damaged { key: String, why: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Who takes a lease, and for how long at a time.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    /// The store root (where `.cairn/` is).
    pub store: SharedStore,
    pub key: String,
    pub host: String,
    pub ttl: Duration,
}

/// A lease this process holds.
#[derive(Debug)]
pub struct Lease {
    options: LeaseOptions,
    record: LeaseRecord,
    etag: ETag,
}

/// The current record of a lease, if any, and its ETag.
pub async fn read(
    store: &SharedStore,
    key: &str,
) -> Result<Option<(LeaseRecord, ETag)>, LeaseError> {
    match store.get_all(key).await {
        Ok((info, body)) => {
            let record = serde_json::from_slice(&body).map_err(|e| LeaseError::Damaged {
                key: key.to_string(),
                why: e.to_string(),
            })?;
            Ok(Some((record, info.etag)))
        }
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

impl Lease {
    /// Takes the lease: when no one holds it, when it expired, or when it is still this
    /// process's earlier holding (`token`, after a crash). Fails with `Held` otherwise.
    pub async fn acquire(options: LeaseOptions, token: Option<&str>) -> Result<Lease, LeaseError> {
        loop {
            let current = read(&options.store, &options.key).await?;
            let condition = match &current {
                None => PutCondition::IfAbsent,
                Some((record, etag))
                    if !record.is_live() || token.is_some_and(|t| t == record.token) =>
                {
                    PutCondition::IfMatch(etag.clone())
                }
                Some((record, _)) => return Err(LeaseError::Held(record.clone())),
            };
            let resumed = current
                .as_ref()
                .filter(|(record, _)| token.is_some_and(|t| t == record.token));
            let now = unix_now();
            let record = LeaseRecord {
                host: options.host.clone(),
                token: resumed.map_or_else(
                    || uuid::Uuid::new_v4().simple().to_string(),
                    |(r, _)| r.token.clone(),
                ),
                acquired: resumed.map_or(now, |(r, _)| r.acquired),
                expires: now + options.ttl.as_secs().max(1),
            };
            match put(&options, &record, condition).await {
                Ok(etag) => {
                    return Ok(Lease {
                        options,
                        record,
                        etag,
                    });
                }
                // Someone else moved first: look again.
                Err(LeaseError::Store(err)) if err.kind() == ErrorKind::PreconditionFailed => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// The store root the lease lives in.
    pub fn store(&self) -> &SharedStore {
        &self.options.store
    }

    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn ttl(&self) -> Duration {
        self.options.ttl
    }

    /// Extends the lease by its TTL; `Lost` if another host has taken it.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let mut record = self.record.clone();
        record.expires = unix_now() + self.options.ttl.as_secs().max(1);
        match put(
            &self.options,
            &record,
            PutCondition::IfMatch(self.etag.clone()),
        )
        .await
        {
            Ok(etag) => {
                self.record = record;
                self.etag = etag;
                Ok(())
            }
            Err(LeaseError::Store(err))
                if matches!(
                    err.kind(),
                    ErrorKind::PreconditionFailed | ErrorKind::NotFound
                ) =>
            {
                let now = read(&self.options.store, &self.options.key)
                    .await
                    .ok()
                    .flatten();
                Err(LeaseError::Lost(now.map(|(record, _)| record)))
            }
            Err(err) => Err(err),
        }
    }

    /// Gives the lease up (after everything is in the store), unless it is no longer ours.
    pub async fn release(self) -> Result<(), LeaseError> {
        match read(&self.options.store, &self.options.key).await? {
            Some((record, _)) if record.token == self.record.token => {
                self.options.store.delete(&self.options.key).await?;
                Ok(())
            }
            other => Err(LeaseError::Lost(other.map(|(record, _)| record))),
        }
    }
}

async fn put(
    options: &LeaseOptions,
    record: &LeaseRecord,
    condition: PutCondition,
) -> Result<ETag, LeaseError> {
    let body = serde_json::to_vec(record).expect("a lease record serializes");
    let put = PutOptions {
        condition,
        ..PutOptions::default()
    };
    Ok(options
        .store
        .put(&options.key, Bytes::from(body), put)
        .await?
        .etag)
}

/// Whether the store honours conditional puts (some S3 implementations accept a second
/// `If-None-Match: *` put of the same key); a lease on one that does not protects nothing.
pub async fn store_honours_conditions(store: &SharedStore) -> Result<bool, StoreError> {
    let key = format!(".cairn/probe/{}", uuid::Uuid::new_v4().simple());
    let once = PutOptions {
        condition: PutCondition::IfAbsent,
        ..PutOptions::default()
    };
    store
        .put(&key, Bytes::from_static(b"1"), once.clone())
        .await?;
    let second = store.put(&key, Bytes::from_static(b"2"), once).await;
    let _ = store.delete(&key).await;
    match second {
        Err(err) if err.kind() == ErrorKind::PreconditionFailed => Ok(true),
        Err(err) => Err(err),
        Ok(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::memory::MemoryStore;

    fn options(store: &SharedStore, host: &str) -> LeaseOptions {
        LeaseOptions {
            store: Arc::clone(store),
            key: lease_key("db"),
            host: host.into(),
            ttl: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn one_host_holds_a_lease_until_it_releases_it() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        let mut a = Lease::acquire(options(&store, "a"), None).await.unwrap();
        let held = Lease::acquire(options(&store, "b"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&held, LeaseError::Held(r) if r.host == "a"),
            "{held}"
        );
        assert!(held.to_string().contains("host a"), "{held}");
        a.renew().await.unwrap();
        a.release().await.unwrap();
        Lease::acquire(options(&store, "b"), None).await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_its_holder_finds_out() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        let short = LeaseOptions {
            ttl: Duration::from_secs(1),
            ..options(&store, "a")
        };
        let mut a = Lease::acquire(short, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let b = Lease::acquire(options(&store, "b"), None).await.unwrap();
        let lost = a.renew().await.unwrap_err();
        assert!(
            matches!(&lost, LeaseError::Lost(Some(r)) if r.host == "b"),
            "{lost}"
        );
        assert!(
            a.release().await.is_err(),
            "a release never deletes another's lease"
        );
        assert_eq!(
            read(&store, &lease_key("db")).await.unwrap().unwrap().0,
            *b.record()
        );
    }

    #[tokio::test]
    async fn a_crashed_holder_resumes_with_its_token() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        let a = Lease::acquire(options(&store, "a"), None).await.unwrap();
        let token = a.record().token.clone();
        drop(a); // the process died without releasing
        let again = Lease::acquire(options(&store, "a"), Some(&token))
            .await
            .unwrap();
        assert_eq!(again.record().token, token);
        assert!(
            Lease::acquire(options(&store, "a"), Some("other"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_store_that_ignores_conditions_is_found_out() {
        let store: SharedStore = Arc::new(MemoryStore::new());
        assert!(store_honours_conditions(&store).await.unwrap());
        let careless = Arc::new(crate::store::faults::FaultyStore::new(Arc::clone(&store)));
        careless.ignore_put_conditions();
        let careless: SharedStore = careless;
        assert!(!store_honours_conditions(&careless).await.unwrap());
        assert!(
            store
                .list_all(".cairn/probe/", false)
                .await
                .unwrap()
                .objects
                .is_empty()
        );
    }
}
