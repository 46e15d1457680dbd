//! `s3://bucket/prefix`: any S3-compatible object store, through aws-sdk-s3.
//!
//! Endpoint, region and path-style addressing come from the store spec or the standard AWS
//! variables and profiles; credentials from the standard AWS chain, a named profile, or a secret
//! file. The SDK retries throttling, 5xx answers and timeouts with backoff.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, RequestChecksumCalculation, ResponseChecksumValidation, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart as S3CompletedPart, Delete, MetadataDirective,
    ObjectIdentifier,
};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::{
    CompletedPart, ETag, ErrorKind, GetOptions, GetResult, GetStream, ListEntry, ListOptions,
    ListPage, Metadata, ObjectInfo, PartSource, PutCondition, PutOptions, PutResult, Result, Store,
    StoreError, UploadId, check_key, check_metadata, clamp_range,
};

/// How to reach a bucket. Unset fields fall back to the standard AWS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket ("" or ending in `/`).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`); by default on when an endpoint is set.
    pub path_style: Option<bool>,
    /// A profile of the shared AWS config and credentials files.
    pub profile: Option<String>,
    /// A file holding `aws_access_key_id` and `aws_secret_access_key` (and optionally
    /// `aws_session_token`) as `name = value` lines.
    pub secret_file: Option<PathBuf>,
    /// Attempts per request, the first included (retries with backoff on retryable errors).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl S3Options {
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: normalize_prefix(&prefix.into()),
            endpoint: None,
            region: None,
            path_style: None,
            profile: None,
            secret_file: None,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            read_timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The default of `timeout=`: how long a request may wait for the store's answer.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// "" stays "", anything else ends in exactly one `/`, without a leading `/`.
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// A bucket (and a prefix inside it) as a [`Store`].
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    /// GETs whose answer body is cut short are asked again, up to this many times in all (the
    /// SDK retries failures before the body only).
    get_attempts: u32,
}

impl S3Store {
    /// Builds a client; this does not contact the store (the first request does).
    pub async fn connect(options: &S3Options) -> Result<Self> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(options.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(options.connect_timeout)
                    .read_timeout(options.read_timeout)
                    .build(),
            );
        loader = loader.region(resolve_region(options).await);
        if let Some(profile) = &options.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(path) = &options.secret_file {
            loader = loader.credentials_provider(read_secret_file(path)?);
        }
        let shared = loader.load().await;
        let custom_endpoint = shared.endpoint_url().is_some();
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(options.path_style.unwrap_or(custom_endpoint))
            // S3-compatible servers differ in which checksums they know; send them only when
            // an operation requires one.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: options.bucket.clone(),
            prefix: options.prefix.clone(),
            get_attempts: options.max_attempts.max(1),
        })
    }

    /// Sends one GET and reads the answer's headers: the object's description, the range the
    /// body brings, and the body still to read; `None` for a range that starts at or past the
    /// object's end.
    async fn send_get(
        &self,
        key: &str,
        options: &GetOptions,
    ) -> Result<Option<(ObjectInfo, Range<u64>, ByteStream)>> {
        let full = self.full_key(key)?;
        if options.range.as_ref().is_some_and(|r| r.start >= r.end) {
            return Ok(None);
        }
        let mut request = self.client.get_object().bucket(&self.bucket).key(&full);
        if let Some(range) = &options.range {
            request = request.range(format!("bytes={}-{}", range.start, range.end - 1));
        }
        if let Some(want) = &options.if_match {
            request = request.if_match(&want.0);
        }
        let out = match request.send().await {
            Ok(out) => out,
            // The range starts at or past the end: zero bytes, as the trait promises.
            Err(SdkError::ServiceError(context)) if context.raw().status().as_u16() == 416 => {
                return Ok(None);
            }
            Err(err) => return Err(classify(err, &format!("GET {key}"))),
        };
        let length = out.content_length().unwrap_or(0).max(0) as u64;
        let size = total_from_content_range(out.content_range()).unwrap_or(length);
        let start = options.range.as_ref().map_or(0, |r| r.start);
        let info = ObjectInfo {
            key: key.to_string(),
            size,
            etag: etag(out.e_tag()),
            last_modified: system_time(out.last_modified()),
            metadata: metadata(out.metadata()),
        };
        Ok(Some((info, start..start + length, out.body)))
    }

    /// One GET: the answer (an object or an error), or `Err` when the answer's body was cut
    /// short, which is worth asking again.
    async fn get_once(
        &self,
        key: &str,
        options: &GetOptions,
    ) -> std::result::Result<Result<GetResult>, StoreError> {
        let (info, range, body) = match self.send_get(key, options).await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ok(self.empty_range(key, options).await),
            Err(err) => return Ok(Err(err)),
        };
        // Into one buffer as the frames arrive, rather than collecting them and then copying
        // them into one: a chunk is held once in memory, not twice.
        let length = range.end - range.start;
        let mut collected = bytes::BytesMut::with_capacity(length.min(64 << 20) as usize);
        let mut frames = body_frames(key, length, body);
        while let Some(frame) = frames.next().await {
            collected.extend_from_slice(&frame?);
        }
        Ok(Ok(GetResult {
            info,
            range,
            body: collected.freeze(),
        }))
    }

    /// The answer to a GET of a range that starts at or past the object's end: no bytes.
    async fn empty_range(&self, key: &str, options: &GetOptions) -> Result<GetResult> {
        let info = self.head(key).await?;
        if let Some(want) = &options.if_match {
            super::condition_holds(key, &PutCondition::IfMatch(want.clone()), Some(&info.etag))?;
        }
        let at = clamp_range(options.range.clone(), info.size).start;
        Ok(GetResult {
            info,
            range: at..at,
            body: Bytes::new(),
        })
    }

    fn full_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// The `x-amz-copy-source` value for a key: bucket and key, URL-encoded but for `/`.
    fn copy_source(&self, full_key: &str) -> String {
        const KEEP: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'/')
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        let raw = format!("{}/{full_key}", self.bucket);
        utf8_percent_encode(&raw, KEEP).to_string()
    }

    fn strip<'k>(&self, full_key: &'k str) -> &'k str {
        full_key.strip_prefix(&self.prefix).unwrap_or(full_key)
    }
}

/// The region: the spec's, else the standard variables' or profile's, else us-east-1 (what most
/// S3-compatible servers expect). Never the EC2 metadata service: off EC2 it only adds delay.
async fn resolve_region(options: &S3Options) -> Region {
    if let Some(region) = &options.region {
        return Region::new(region.clone());
    }
    let mut profile = ProfileFileRegionProvider::builder();
    if let Some(name) = &options.profile {
        profile = profile.profile_name(name);
    }
    RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(profile.build())
        .or_else(Region::new("us-east-1"))
        .region()
        .await
        .unwrap_or_else(|| Region::new("us-east-1"))
}

/// Whether a failure to send a request came from finding no usable credentials.
fn is_credentials_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if current.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Reads static credentials from `path`: `name = value` lines; `#` comments and `[section]`
/// headers are ignored, so a one-profile AWS credentials file works as it is.
fn read_secret_file(path: &Path) -> Result<Credentials> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StoreError::invalid(format!("cannot read secret file {}: {e}", path.display()))
    })?;
    let mut access_key = None;
    let mut secret_key = None;
    let mut token = None;
    for line in text.lines().map(str::trim) {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match name.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => access_key = Some(value),
            "aws_secret_access_key" => secret_key = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    match (access_key, secret_key) {
        (Some(access_key), Some(secret_key)) => Ok(Credentials::new(
            access_key,
            secret_key,
            token,
            None,
            "cairn-secret-file",
        )),
        _ => Err(StoreError::invalid(format!(
            "secret file {} must set aws_access_key_id and aws_secret_access_key",
            path.display()
        ))),
    }
}

/// An error and its causes, each once, joined by ": " (the SDK's own display repeats itself).
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(err);
    while let Some(current) = cause {
        let text = current.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = current.source();
    }
    parts.join(": ")
}

/// Sorts an SDK error into an [`ErrorKind`], keeping the store's code and message.
fn classify<E>(err: SdkError<E, aws_smithy_runtime_api::http::Response>, what: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(context) => {
            let status = context.raw().status().as_u16();
            let code = context.err().code();
            let kind = kind_of(code, status);
            let detail = match context.err().message() {
                Some(message) => message.to_string(),
                // No parsed message: show the start of what the store sent instead.
                None => {
                    let raw = context.raw().body().bytes().unwrap_or_default();
                    let shown = &raw[..raw.len().min(300)];
                    format!("unexpected answer: {:?}", String::from_utf8_lossy(shown))
                }
            };
            let code = code.unwrap_or("no error code");
            StoreError::new(kind, format!("{what}: {code} (HTTP {status}): {detail}"))
        }
        SdkError::TimeoutError(_) => {
            StoreError::new(ErrorKind::Timeout, format!("{what}: {}", causes(&err)))
        }
        SdkError::DispatchFailure(_) if is_credentials_failure(&err) => StoreError::new(
            ErrorKind::AccessDenied,
            format!(
                "{what}: no usable AWS credentials were found (looked in the spec's secret_file, \
                 the AWS_* variables, the shared config and credentials files, web identity, \
                 and container and instance metadata)"
            ),
        ),
        SdkError::DispatchFailure(failure) => {
            let kind = if failure.is_timeout() {
                ErrorKind::Timeout
            } else if failure.is_user() {
                ErrorKind::InvalidRequest
            } else {
                ErrorKind::Unavailable
            };
            StoreError::new(kind, format!("{what}: {}", causes(&err)))
        }
        SdkError::ResponseError(_) => {
            StoreError::new(ErrorKind::Unavailable, format!("{what}: {}", causes(&err)))
        }
        SdkError::ConstructionFailure(_) => {
            StoreError::invalid(format!("{what}: {}", causes(&err)))
        }
        _ => StoreError::other(format!("{what}: {}", causes(&err))),
    }
}

fn kind_of(code: Option<&str>, status: u16) -> ErrorKind {
    match code {
        Some("NoSuchKey" | "NotFound" | "NoSuchUpload") => ErrorKind::NotFound,
        Some("NoSuchBucket") => ErrorKind::NoSuchBucket,
        Some("PreconditionFailed" | "ConditionalRequestConflict") => ErrorKind::PreconditionFailed,
        Some(
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequests",
        ) => ErrorKind::Throttled,
        Some(
            "AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "InvalidToken"
            | "AllAccessDisabled",
        ) => ErrorKind::AccessDenied,
        Some("InternalError" | "ServiceUnavailable") => ErrorKind::Unavailable,
        Some("RequestTimeout") => ErrorKind::Timeout,
        _ => match status {
            404 => ErrorKind::NotFound,
            409 | 412 => ErrorKind::PreconditionFailed,
            429 | 503 => ErrorKind::Throttled,
            500..=599 => ErrorKind::Unavailable,
            401 | 403 => ErrorKind::AccessDenied,
            400..=499 => ErrorKind::InvalidRequest,
            _ => ErrorKind::Other,
        },
    }
}

fn system_time(time: Option<&DateTime>) -> SystemTime {
    time.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn etag(raw: Option<&str>) -> ETag {
    ETag(raw.unwrap_or_default().to_string())
}

fn metadata(raw: Option<&std::collections::HashMap<String, String>>) -> Metadata {
    raw.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// The frames of a GET's body as they arrive, ending with an error if the body is cut short
/// of `length` bytes or fails.
fn body_frames(key: &str, length: u64, body: ByteStream) -> BoxStream<'static, Result<Bytes>> {
    let key = key.to_string();
    stream::unfold(Some((body, 0u64)), move |state| {
        let key = key.clone();
        async move {
            let (mut body, got) = state?;
            match body.try_next().await {
                Ok(Some(frame)) => {
                    let got = got + frame.len() as u64;
                    Some((Ok(frame), Some((body, got))))
                }
                Ok(None) if got == length => None,
                Ok(None) => {
                    let message = format!("GET {key}: got {got} of {length} bytes");
                    Some((Err(StoreError::new(ErrorKind::Unavailable, message)), None))
                }
                Err(err) => {
                    let message = format!("GET {key}: reading the body: {err}");
                    Some((Err(StoreError::new(ErrorKind::Unavailable, message)), None))
                }
            }
        }
    })
    .boxed()
}

/// The total size in a `Content-Range: bytes a-b/total` header.
fn total_from_content_range(content_range: Option<&str>) -> Option<u64> {
    content_range?.rsplit_once('/')?.1.parse().ok()
}

#[async_trait]
impl Store for S3Store {
    async fn head(&self, key: &str) -> Result<ObjectInfo> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify(e, &format!("HEAD {key}")))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: etag(out.e_tag()),
            last_modified: system_time(out.last_modified()),
            metadata: metadata(out.metadata()),
        })
    }

    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult> {
        let mut attempt = 1;
        loop {
            match self.get_once(key, &options).await {
                Ok(answer) => return answer,
                Err(cut) if attempt >= self.get_attempts => return Err(cut),
                Err(cut) => {
                    tracing::debug!("{cut}; asking again");
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn get_stream(&self, key: &str, options: GetOptions) -> Result<GetStream> {
        let Some((info, range, body)) = self.send_get(key, &options).await? else {
            let empty = self.empty_range(key, &options).await?;
            return Ok(GetStream {
                info: empty.info,
                range: empty.range,
                body: stream::empty().boxed(),
            });
        };
        let body = body_frames(key, range.end - range.start, body);
        Ok(GetStream { info, range, body })
    }

    async fn put(&self, key: &str, body: Bytes, options: PutOptions) -> Result<PutResult> {
        let full = self.full_key(key)?;
        check_metadata(&options.metadata)?;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body))
            .set_metadata(Some(options.metadata.into_iter().collect()));
        match &options.condition {
            PutCondition::Always => {}
            PutCondition::IfAbsent => request = request.if_none_match("*"),
            PutCondition::IfMatch(want) => request = request.if_match(&want.0),
        }
        let out = request
            .send()
            .await
            .map_err(|e| classify(e, &format!("PUT {key}")))?;
        Ok(PutResult {
            etag: etag(out.e_tag()),
        })
    }

    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId> {
        let full = self.full_key(key)?;
        check_metadata(&metadata)?;
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .set_metadata(Some(metadata.into_iter().collect()))
            .send()
            .await
            .map_err(|e| classify(e, &format!("starting a multipart upload of {key}")))?;
        out.upload_id()
            .map(|id| UploadId(id.to_string()))
            .ok_or_else(|| StoreError::other(format!("{key}: the store returned no upload id")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.0)
            .part_number(part_number as i32)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(e, &format!("uploading part {part_number} of {key}")))?;
        Ok(CompletedPart {
            part_number,
            etag: etag(out.e_tag()),
        })
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        part_source: &PartSource,
    ) -> Result<CompletedPart> {
        let (source_key, source_range) = (&part_source.key, &part_source.range);
        // Some S3-compatible servers ignore x-amz-copy-source-if-match (moto does): check the
        // version first as well; S3 itself then also enforces the header atomically.
        if let Some(wanted) = &part_source.if_match {
            let current = self.head(source_key).await?.etag;
            if current != *wanted {
                return Err(StoreError::new(
                    ErrorKind::PreconditionFailed,
                    format!("{source_key} is no longer version {wanted}, but {current}"),
                ));
            }
        }
        let full = self.full_key(key)?;
        let source = self.full_key(source_key)?;
        if source_range.start >= source_range.end {
            return Err(StoreError::invalid(format!(
                "empty range {source_range:?} of {source_key}"
            )));
        }
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.0)
            .part_number(part_number as i32)
            .copy_source(self.copy_source(&source))
            .set_copy_source_if_match(part_source.if_match.as_ref().map(|e| e.0.clone()))
            .copy_source_range(format!(
                "bytes={}-{}",
                source_range.start,
                source_range.end - 1
            ))
            .send()
            .await
            .map_err(|e| {
                classify(
                    e,
                    &format!("copying part {part_number} of {key} from {source_key}"),
                )
            })?;
        Ok(CompletedPart {
            part_number,
            etag: etag(out.copy_part_result().and_then(|r| r.e_tag())),
        })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult> {
        let full = self.full_key(key)?;
        let parts = parts
            .into_iter()
            .map(|p| {
                S3CompletedPart::builder()
                    .part_number(p.part_number as i32)
                    .e_tag(p.etag.0)
                    .build()
            })
            .collect();
        let mut request = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.0)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        match &condition {
            PutCondition::Always => {}
            PutCondition::IfAbsent => request = request.if_none_match("*"),
            PutCondition::IfMatch(want) => request = request.if_match(&want.0),
        }
        let out = request
            .send()
            .await
            .map_err(|e| classify(e, &format!("completing the multipart upload of {key}")))?;
        Ok(PutResult {
            etag: etag(out.e_tag()),
        })
    }

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()> {
        let full = self.full_key(key)?;
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.0)
            .send()
            .await
            .map_err(|e| classify(e, &format!("aborting the multipart upload of {key}")))?;
        Ok(())
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let max = options
            .max_keys
            .unwrap_or(super::MAX_LIST_PAGE)
            .clamp(1, super::MAX_LIST_PAGE);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .set_delimiter(options.delimited.then(|| "/".to_string()))
            .set_continuation_token(options.continuation)
            .max_keys(max as i32)
            .send()
            .await
            .map_err(|e| classify(e, &format!("LIST {prefix:?}")))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|object| {
                Some(ListEntry {
                    key: self.strip(object.key()?).to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    etag: etag(object.e_tag()),
                    last_modified: system_time(object.last_modified()),
                })
            })
            .collect();
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| Some(self.strip(p.prefix()?).to_string()))
            .collect();
        let next = if out.is_truncated().unwrap_or(false) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify(e, &format!("DELETE {key}")))?;
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        for chunk in keys.chunks(super::MAX_LIST_PAGE) {
            let mut objects = Vec::with_capacity(chunk.len());
            for key in chunk {
                let full = self.full_key(key)?;
                let object = ObjectIdentifier::builder()
                    .key(full)
                    .build()
                    .map_err(|e| StoreError::invalid(e.to_string()))?;
                objects.push(object);
            }
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::invalid(e.to_string()))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify(e, &format!("deleting {} keys", chunk.len())))?;
            if !out.errors().is_empty() {
                let failed: Vec<String> = out
                    .errors()
                    .iter()
                    .map(|e| {
                        format!(
                            "{} ({})",
                            self.strip(e.key().unwrap_or_default()),
                            e.message().or(e.code()).unwrap_or("unknown error")
                        )
                    })
                    .collect();
                return Err(StoreError::other(format!(
                    "could not delete {}",
                    failed.join(", ")
                )));
            }
        }
        Ok(())
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult> {
        let source = self.full_key(source_key)?;
        let dest = self.full_key(dest_key)?;
        let mut request = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(&dest)
            .copy_source(self.copy_source(&source));
        if let Some(metadata) = metadata {
            check_metadata(&metadata)?;
            request = request
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(metadata.into_iter().collect()));
        }
        let out = request
            .send()
            .await
            .map_err(|e| classify(e, &format!("copying {source_key} to {dest_key}")))?;
        Ok(PutResult {
            etag: etag(out.copy_object_result().and_then(|r| r.e_tag())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalized() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("vols"), "vols/");
        assert_eq!(normalize_prefix("/a/b/"), "a/b/");
    }

    #[test]
    fn error_codes_sort_into_kinds() {
        assert_eq!(kind_of(Some("NoSuchBucket"), 404), ErrorKind::NoSuchBucket);
        assert_eq!(kind_of(None, 404), ErrorKind::NotFound);
        assert_eq!(kind_of(Some("SlowDown"), 503), ErrorKind::Throttled);
        assert_eq!(
            kind_of(Some("InvalidAccessKeyId"), 403),
            ErrorKind::AccessDenied
        );
        assert_eq!(kind_of(None, 500), ErrorKind::Unavailable);
        assert_eq!(
            kind_of(Some("PreconditionFailed"), 412),
            ErrorKind::PreconditionFailed
        );
        assert!(kind_of(None, 502).is_retryable());
    }

    #[test]
    fn secret_files_accept_the_aws_credentials_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(
            &path,
            "[default]\naws_access_key_id = AKID\n# note\naws_secret_access_key=\"s3cr3t\"\n",
        )
        .unwrap();
        let credentials = read_secret_file(&path).unwrap();
        assert_eq!(credentials.access_key_id(), "AKID");
        assert_eq!(credentials.secret_access_key(), "s3cr3t");
        std::fs::write(&path, "aws_access_key_id = AKID\n").unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(err.message().contains("aws_secret_access_key"), "{err}");
    }
}
