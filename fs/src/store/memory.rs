//! `memory:`: a store held in process memory, for unit tests of logic. It keeps S3's rules
//! (ETags, conditions, part sizes, listing order) so that logic tested on it behaves the same on
//! a real store, but it is never a stand-in for S3 in a test that claims S3 behaviour.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::listing::{paginate, roll_up};
use super::{
    CompletedPart, ETag, ErrorKind, GetOptions, GetResult, ListEntry, ListOptions, ListPage,
    Metadata, ObjectInfo, PartSource, PutCondition, PutOptions, PutResult, Result, Store,
    StoreError, UploadId, check_key, check_metadata, check_parts, clamp_range, condition_holds,
    content_etag, multipart_etag,
};

#[derive(Debug, Clone)]
struct Object {
    body: Bytes,
    etag: ETag,
    last_modified: SystemTime,
    metadata: Metadata,
}

impl Object {
    fn info(&self, key: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: self.body.len() as u64,
            etag: self.etag.clone(),
            last_modified: self.last_modified,
            metadata: self.metadata.clone(),
        }
    }
}

#[derive(Debug)]
struct Upload {
    key: String,
    metadata: Metadata,
    parts: BTreeMap<u32, (ETag, Bytes)>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    uploads: HashMap<String, Upload>,
    next_upload: u64,
}

/// An in-memory store. Cheap to create; each instance is empty and private.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn store_object(
        &self,
        key: &str,
        body: Bytes,
        etag: ETag,
        metadata: Metadata,
        condition: &PutCondition,
    ) -> Result<PutResult> {
        let mut state = self.state();
        let current = state.objects.get(key).map(|o| &o.etag);
        condition_holds(key, condition, current)?;
        let object = Object {
            body,
            etag: etag.clone(),
            last_modified: SystemTime::now(),
            metadata,
        };
        state.objects.insert(key.to_string(), object);
        Ok(PutResult { etag })
    }

    fn object(&self, key: &str) -> Result<Object> {
        self.state()
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::not_found(key))
    }

    fn add_part(
        &self,
        key: &str,
        upload: &UploadId,
        number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let etag = content_etag(&body);
        let mut state = self.state();
        let pending = state
            .uploads
            .get_mut(&upload.0)
            .filter(|u| u.key == key)
            .ok_or_else(|| no_such_upload(key, upload))?;
        pending.parts.insert(number, (etag.clone(), body));
        Ok(CompletedPart {
            part_number: number,
            etag,
        })
    }
}

fn no_such_upload(key: &str, upload: &UploadId) -> StoreError {
    StoreError::new(
        super::ErrorKind::NotFound,
        format!("{key}: no multipart upload {}", upload.0),
    )
}

#[async_trait]
impl Store for MemoryStore {
    async fn head(&self, key: &str) -> Result<ObjectInfo> {
        check_key(key)?;
        Ok(self.object(key)?.info(key))
    }

    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult> {
        check_key(key)?;
        let object = self.object(key)?;
        condition_holds(
            key,
            &options
                .if_match
                .map_or(PutCondition::Always, PutCondition::IfMatch),
            Some(&object.etag),
        )?;
        let range = clamp_range(options.range, object.body.len() as u64);
        let body = object.body.slice(range.start as usize..range.end as usize);
        Ok(GetResult {
            info: object.info(key),
            range,
            body,
        })
    }

    async fn put(&self, key: &str, body: Bytes, options: PutOptions) -> Result<PutResult> {
        check_key(key)?;
        check_metadata(&options.metadata)?;
        let etag = content_etag(&body);
        self.store_object(key, body, etag, options.metadata, &options.condition)
    }

    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId> {
        check_key(key)?;
        check_metadata(&metadata)?;
        let mut state = self.state();
        state.next_upload += 1;
        let id = format!("memory-upload-{}", state.next_upload);
        let upload = Upload {
            key: key.to_string(),
            metadata,
            parts: BTreeMap::new(),
        };
        state.uploads.insert(id.clone(), upload);
        Ok(UploadId(id))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        self.add_part(key, upload, part_number, body)
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        source: &PartSource,
    ) -> Result<CompletedPart> {
        let (source_key, range) = (&source.key, &source.range);
        let object = self.object(source_key)?;
        let size = object.body.len() as u64;
        if source
            .if_match
            .as_ref()
            .is_some_and(|etag| *etag != object.etag)
        {
            return Err(StoreError::new(
                ErrorKind::PreconditionFailed,
                format!("{source_key} is no longer version {:?}", source.if_match),
            ));
        }
        if range.start >= range.end || range.end > size {
            return Err(StoreError::invalid(format!(
                "range {range:?} is not inside {source_key} ({size} bytes)"
            )));
        }
        let body = object.body.slice(range.start as usize..range.end as usize);
        self.add_part(key, upload, part_number, body)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult> {
        let (metadata, bodies) = {
            let state = self.state();
            let pending = state
                .uploads
                .get(&upload.0)
                .filter(|u| u.key == key)
                .ok_or_else(|| no_such_upload(key, upload))?;
            let mut bodies = Vec::with_capacity(parts.len());
            for part in &parts {
                match pending.parts.get(&part.part_number) {
                    Some((etag, body)) if *etag == part.etag => bodies.push(body.clone()),
                    _ => {
                        return Err(StoreError::invalid(format!(
                            "part {} of {key} was not uploaded with ETag {}",
                            part.part_number, part.etag
                        )));
                    }
                }
            }
            (pending.metadata.clone(), bodies)
        };
        let sizes: Vec<u64> = bodies.iter().map(|b| b.len() as u64).collect();
        check_parts(&parts, &sizes)?;
        let etag = multipart_etag(parts.iter().map(|p| &p.etag));
        let mut joined = BytesMut::with_capacity(sizes.iter().sum::<u64>() as usize);
        for body in &bodies {
            joined.extend_from_slice(body);
        }
        let result = self.store_object(key, joined.freeze(), etag, metadata, &condition)?;
        self.state().uploads.remove(&upload.0);
        Ok(result)
    }

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()> {
        let mut state = self.state();
        match state.uploads.get(&upload.0) {
            Some(pending) if pending.key == key => {
                state.uploads.remove(&upload.0);
                Ok(())
            }
            _ => Err(no_such_upload(key, upload)),
        }
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage> {
        let state = self.state();
        let entries = state
            .objects
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, object)| ListEntry {
                key: key.clone(),
                size: object.body.len() as u64,
                etag: object.etag.clone(),
                last_modified: object.last_modified,
            });
        let items = roll_up(prefix, options.delimited, entries);
        Ok(paginate(items, &options))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.state().objects.remove(key);
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let mut state = self.state();
        for key in keys {
            state.objects.remove(key);
        }
        Ok(())
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult> {
        check_key(dest_key)?;
        let source = self.object(source_key)?;
        let metadata = match metadata {
            Some(replacement) => {
                check_metadata(&replacement)?;
                replacement
            }
            None => source.metadata,
        };
        self.store_object(
            dest_key,
            source.body,
            source.etag,
            metadata,
            &PutCondition::Always,
        )
    }
}
