//! Applying one change of the change log to the store (a put of a file, a directory marker or
//! a symlink, a copy, new attributes, a delete), or a batch of deletes in one request.

use bytes::Bytes;

use super::Applied;
use super::put::Snapshot;
use crate::attrs::{Attrs, Kind};
use crate::error::{FsError, FsResult};
use crate::fs::{Filesystem, blocking};
use crate::journal::{Change, Entry};
use crate::store::{ETag, ErrorKind, PutOptions};

impl Filesystem {
    /// Applies one change to the store.
    pub(super) async fn apply(&self, entry: &Entry) -> FsResult<Applied> {
        let key = entry.key.as_str();
        let seq = entry.seq;
        self.update_change_log(move |j| j.mark_started(seq)).await?;
        match &entry.change {
            Change::PutFile { cache_file, attrs } => {
                let (cache, name) = (self.cache.clone(), cache_file.clone());
                if !blocking(move || Ok(cache.room_for_copy_of(&name))).await? {
                    return self.put_in_place(entry, cache_file, (*attrs).into()).await;
                }
                let snapshot = match self.snapshot(cache_file).await {
                    Err(err) if err.errno() == libc::ENOSPC => {
                        return self.put_in_place(entry, cache_file, (*attrs).into()).await;
                    }
                    other => other?,
                };
                let Some(Snapshot {
                    file,
                    path: snapshot,
                    reading,
                    size,
                    holder,
                    partial,
                    _in_flight: in_flight,
                }) = snapshot
                else {
                    return Ok(Applied::Dropped(format!("the cache file of {key} is gone")));
                };
                let put = self
                    .put_file(key, file, size, (*attrs).into(), partial.as_ref())
                    .await;
                if reading.is_none() {
                    let path = snapshot.clone();
                    let _ = blocking(move || Ok(std::fs::remove_file(path)?)).await;
                }
                drop(reading);
                let etag = put?;
                self.after_put(entry, cache_file, etag.clone(), size, holder, partial)
                    .await?;
                drop(in_flight);
                Ok(Applied::Done {
                    bytes: size,
                    stored: Some((Kind::File, etag, size)),
                })
            }
            Change::PutDir { attrs } => {
                let attrs: Attrs = (*attrs).into();
                let marker = format!("{key}/");
                let put = self
                    .store
                    .put(
                        &marker,
                        Bytes::new(),
                        PutOptions::with_metadata(attrs.encode()),
                    )
                    .await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: Some((Kind::Dir, put.etag, 0)),
                })
            }
            Change::PutSymlink { target, attrs } => {
                let attrs: Attrs = (*attrs).into();
                let body = Bytes::from(target.clone().into_bytes());
                let put = self
                    .store
                    .put(key, body, PutOptions::with_metadata(attrs.encode()))
                    .await?;
                let length = target.len() as u64;
                Ok(Applied::Done {
                    bytes: length,
                    stored: Some((Kind::Symlink, put.etag, length)),
                })
            }
            Change::Copy {
                from,
                etag,
                size,
                attrs,
            } => {
                let attrs: Attrs = (*attrs).into();
                match self.store.copy(from, key, Some(attrs.encode())).await {
                    Ok(put) => {
                        self.after_copy(key, &ETag(etag.clone()), put.etag.clone())
                            .await?;
                        Ok(Applied::Done {
                            bytes: 0,
                            stored: Some((Kind::File, put.etag, *size)),
                        })
                    }
                    Err(err) if err.kind() == ErrorKind::NotFound => Ok(Applied::Dropped(format!(
                        "{from}, renamed to {key}, is gone from the store"
                    ))),
                    Err(err) => Err(err.into()),
                }
            }
            Change::SetAttrs { kind, attrs } => {
                let attrs: Attrs = (*attrs).into();
                let result = match Kind::from(*kind) {
                    Kind::Dir => {
                        let marker = format!("{key}/");
                        self.store
                            .put(
                                &marker,
                                Bytes::new(),
                                PutOptions::with_metadata(attrs.encode()),
                            )
                            .await
                    }
                    Kind::File | Kind::Symlink => {
                        self.store.copy(key, key, Some(attrs.encode())).await
                    }
                };
                match result {
                    Ok(_) => Ok(Applied::Done {
                        bytes: 0,
                        stored: None,
                    }),
                    Err(err) if err.kind() == ErrorKind::NotFound => {
                        Ok(Applied::Dropped(format!("{key} is gone from the store")))
                    }
                    Err(err) => Err(err.into()),
                }
            }
            Change::Delete => {
                self.store.delete(key).await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                })
            }
            Change::DeleteDir => {
                self.store.delete(&format!("{key}/")).await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                })
            }
        }
    }

    /// Applies deletes of several keys with one request, and settles each.
    pub(super) async fn apply_deletes(&self, deletes: Vec<Entry>) {
        let keys: Vec<String> = deletes.iter().map(|e| e.key.clone()).collect();
        let deleted = self.store.delete_many(&keys).await;
        self.pace(
            deleted
                .as_ref()
                .err()
                .map(|e| FsError::Store(e.clone()))
                .as_ref(),
        );
        if let Err(err) = &deleted
            && !err.kind().is_retryable()
        {
            // A store without multi-object deletes (or refusing this one): one at a time.
            tracing::warn!("deleting {} keys in one request: {err}", keys.len());
            for entry in deletes {
                let outcome = self.apply(&entry).await;
                self.settle(entry, outcome).await;
            }
            return;
        }
        for entry in deletes {
            let outcome = match &deleted {
                Ok(()) => Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                }),
                Err(err) => Err(FsError::Store(err.clone())),
            };
            self.settle(entry, outcome).await;
        }
    }
}
