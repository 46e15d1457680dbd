//! `cairn store check`: a small round trip through a store (open, list, put, get, list, delete)
//! that prints each step as it goes, and on failure says which step failed, the store's message,
//! and what to do about it.

use std::path::Path;
use std::process::ExitCode;

use bytes::Bytes;
use cairn_fs::store::dir::DirStore;
use cairn_fs::store::{
    ErrorKind, ListOptions, Metadata, PutCondition, PutOptions, SharedStore, StoreError, StoreExt,
    StoreSpec, open_store,
};

/// Runs the check and prints its report; the exit code says whether the store works.
pub async fn run(spec: Option<&str>, state_dir: &Path) -> ExitCode {
    let (spec, embedded) = match spec {
        Some(text) => match text.parse::<StoreSpec>() {
            Ok(spec) => (spec, false),
            Err(err) => {
                eprintln!("error: {}", err.message());
                return ExitCode::FAILURE;
            }
        },
        None => (StoreSpec::Dir(state_dir.join("store")), true),
    };
    println!("checking {spec}");
    match check(&spec, embedded).await {
        Ok(()) => {
            println!("the store works");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("  {:<8} FAILED", failure.step);
            eprintln!("error: {} failed: {}", failure.step, failure.error);
            eprintln!("hint: {}", hint(&spec, &failure.error));
            ExitCode::FAILURE
        }
    }
}

struct Failure {
    step: &'static str,
    error: StoreError,
}

fn ok(step: &str, detail: impl std::fmt::Display) {
    println!("  {step:<8} ok  {detail}");
}

/// Tags a step's error with the step's name.
fn at<T>(step: &'static str, result: Result<T, StoreError>) -> Result<T, Failure> {
    result.map_err(|error| Failure { step, error })
}

/// Opens the store; the embedded default store is created on first use, as the daemon does.
async fn open(spec: &StoreSpec, embedded: bool) -> Result<SharedStore, StoreError> {
    match spec {
        // Fail fast: a check should answer in seconds, not retry for long.
        StoreSpec::S3(options) => {
            let mut quick = options.clone();
            quick.max_attempts = 2;
            open_store(&StoreSpec::S3(quick)).await
        }
        StoreSpec::Dir(path) if embedded => Ok(std::sync::Arc::new(DirStore::create(path)?)),
        other => open_store(other).await,
    }
}

async fn check(spec: &StoreSpec, embedded: bool) -> Result<(), Failure> {
    let store = at("open", open(spec, embedded).await)?;
    ok("open", describe(spec));

    let options = ListOptions {
        delimited: true,
        continuation: None,
        max_keys: Some(100),
    };
    let top = at("list", store.list("", options).await)?;
    ok(
        "list",
        format!(
            "({} objects and {} prefixes at the top)",
            top.objects.len(),
            top.prefixes.len()
        ),
    );

    let key = format!(".cairn/check/{}", uuid::Uuid::new_v4().simple());
    let body = Bytes::from(format!("cairn store check {key}\n"));
    let mut metadata = Metadata::new();
    metadata.insert("mode".into(), "33188".into());
    let put_options = PutOptions {
        metadata: metadata.clone(),
        condition: PutCondition::IfAbsent,
    };
    let written = at("put", store.put(&key, body.clone(), put_options).await)?;
    ok(
        "put",
        format!("({key}, {} bytes, ETag {})", body.len(), written.etag),
    );

    let result = verify_and_clean(&store, &key, &body, &metadata).await;
    if result.is_err() {
        // Leave nothing behind even when a later step failed.
        let _ = store.delete(&key).await;
    }
    result
}

async fn verify_and_clean(
    store: &SharedStore,
    key: &str,
    body: &Bytes,
    metadata: &Metadata,
) -> Result<(), Failure> {
    let (info, read) = at("get", store.get_all(key).await)?;
    if read != *body || info.metadata != *metadata {
        let error = StoreError::other(format!(
            "read back {} bytes and metadata {:?}; wrote {} bytes and {metadata:?}",
            read.len(),
            info.metadata,
            body.len()
        ));
        return Err(Failure { step: "get", error });
    }
    ok("get", "(bytes and metadata match)");

    let listed = at("list", store.list_all(".cairn/check/", false).await)?;
    if !listed.objects.iter().any(|o| o.key == key) {
        let error = StoreError::other(format!("{key} was written but is not listed"));
        return Err(Failure {
            step: "list",
            error,
        });
    }
    ok("list", "(the new object is listed)");

    at("delete", store.delete(key).await)?;
    if at("delete", store.head_opt(key).await)?.is_some() {
        let error = StoreError::other(format!("{key} is still there after delete"));
        return Err(Failure {
            step: "delete",
            error,
        });
    }
    ok("delete", "(gone)");
    Ok(())
}

fn describe(spec: &StoreSpec) -> String {
    match spec {
        StoreSpec::S3(options) => format!(
            "(bucket {:?}, prefix {:?}, endpoint {})",
            options.bucket,
            options.prefix,
            options
                .endpoint
                .as_deref()
                .unwrap_or("from the AWS configuration")
        ),
        StoreSpec::Dir(path) => format!("(directory {})", path.display()),
        StoreSpec::Memory => "(in memory: nothing outlives this command)".to_string(),
    }
}

/// What a user can do about a failure of this kind on this store.
fn hint(spec: &StoreSpec, error: &StoreError) -> String {
    let endpoint = match spec {
        StoreSpec::S3(options) => options
            .endpoint
            .clone()
            .unwrap_or_else(|| "the endpoint from the AWS configuration".to_string()),
        _ => String::new(),
    };
    match (spec, error.kind()) {
        (StoreSpec::S3(_), ErrorKind::Unavailable | ErrorKind::Timeout) => format!(
            "nothing usable answered at {endpoint}: check the endpoint address and port (the \
             spec's endpoint= or AWS_ENDPOINT_URL), that the S3 server is running, and the \
             network in between"
        ),
        (StoreSpec::S3(options), ErrorKind::NoSuchBucket) => format!(
            "the bucket {:?} does not exist at {endpoint}: create it (for example `aws s3 mb \
             s3://{}`) or correct the bucket name in the spec",
            options.bucket, options.bucket
        ),
        (StoreSpec::S3(_), ErrorKind::AccessDenied) => {
            "the store refused the credentials: check the secret_file= of the spec, or \
             AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may list, \
             read, write and delete in this bucket and prefix"
                .to_string()
        }
        (StoreSpec::Dir(path), ErrorKind::NoSuchBucket) => format!(
            "the directory {} does not exist: create it (mkdir -p, mode 0700) or correct the path",
            path.display()
        ),
        (StoreSpec::Dir(path), ErrorKind::AccessDenied) => format!(
            "cairn may not read or write {}: run it as root or fix the directory's owner and mode",
            path.display()
        ),
        (_, ErrorKind::Throttled) => {
            "the store is throttling requests: try again in a minute".to_string()
        }
        (_, ErrorKind::InvalidRequest) => {
            "the store refused the request as malformed: check the spec's region and path_style"
                .to_string()
        }
        _ => "see the store's message above".to_string(),
    }
}
