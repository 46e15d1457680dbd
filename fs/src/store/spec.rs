//! Store specs: the one-line names of stores that users type and configs hold
//! (`s3://bucket/prefix?endpoint=...`, `dir:///path`, `memory:`), and opening them.
//!
//! A spec never holds a secret: credentials come from the AWS chain, a profile, or a secret file
//! named by path, so a spec can be shown in logs, reports and `docker volume inspect`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use url::Url;

use super::dir::DirStore;
use super::memory::MemoryStore;
use super::s3::{DEFAULT_TIMEOUT, S3Options, S3Store};
use super::{Result, SharedStore, StoreError};

/// The query parameters an `s3://` spec accepts.
const S3_PARAMETERS: &[&str] = &[
    "endpoint",
    "region",
    "path_style",
    "profile",
    "secret_file",
    "timeout",
];

/// Which store, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    S3(S3Options),
    Dir(PathBuf),
    Memory,
}

fn bad_spec(spec: &str, why: impl fmt::Display) -> StoreError {
    StoreError::invalid(format!(
        "bad store spec {spec:?}: {why} (expected s3://BUCKET[/PREFIX][?endpoint=URL&region=R&\
         path_style=true|false&profile=NAME&secret_file=PATH&timeout=SECONDS], dir:///ABSOLUTE/PATH or memory:)"
    ))
}

fn decode(spec: &str, raw: &str) -> Result<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad_spec(spec, "it is not valid UTF-8 once decoded"))
}

impl FromStr for StoreSpec {
    type Err = StoreError;

    fn from_str(spec: &str) -> Result<Self> {
        if spec == "memory:" {
            return Ok(Self::Memory);
        }
        let url = Url::parse(spec).map_err(|e| bad_spec(spec, e))?;
        match url.scheme() {
            "s3" => parse_s3(spec, &url).map(Self::S3),
            "dir" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.query().is_some() {
                    return Err(bad_spec(
                        spec,
                        "a dir store takes an absolute path and no options",
                    ));
                }
                let path = decode(spec, url.path())?;
                // The URL parser resolves `..` away; refuse it in what the user wrote instead.
                let written = decode(spec, &spec["dir:".len()..])?;
                if !path.starts_with('/') || written.split('/').any(|s| s == "..") {
                    return Err(bad_spec(spec, "the path must be absolute, without '..'"));
                }
                Ok(Self::Dir(PathBuf::from(path)))
            }
            other => Err(bad_spec(spec, format!("unknown store type {other:?}"))),
        }
    }
}

fn parse_s3(spec: &str, url: &Url) -> Result<S3Options> {
    let bucket = url.host_str().unwrap_or_default();
    if bucket.is_empty() {
        return Err(bad_spec(spec, "the bucket name is missing"));
    }
    let mut options = S3Options::new(decode(spec, bucket)?, decode(spec, url.path())?);
    for (name, value) in url.query_pairs() {
        let value = value.into_owned();
        match name.as_ref() {
            "endpoint" => {
                Url::parse(&value)
                    .map_err(|e| bad_spec(spec, format!("endpoint {value:?}: {e}")))?;
                options.endpoint = Some(value);
            }
            "region" => options.region = Some(value),
            "path_style" => {
                let on = value
                    .parse()
                    .map_err(|_| bad_spec(spec, "path_style must be true or false"))?;
                options.path_style = Some(on);
            }
            "profile" => options.profile = Some(value),
            "secret_file" => options.secret_file = Some(PathBuf::from(value)),
            "timeout" => {
                let seconds: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| bad_spec(spec, "timeout must be a number of seconds above 0"))?;
                options.read_timeout = std::time::Duration::from_secs_f64(seconds);
            }
            secret
                if secret.contains("key")
                    || secret.contains("secret")
                    || secret.contains("token") =>
            {
                return Err(bad_spec(
                    spec,
                    format!(
                        "{secret:?} looks like a credential; a spec is shown in logs and \
                         reports, so credentials go in a secret_file or the AWS configuration"
                    ),
                ));
            }
            unknown => {
                return Err(bad_spec(
                    spec,
                    format!(
                        "unknown option {unknown:?}; valid options: {}",
                        S3_PARAMETERS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(options)
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory:"),
            Self::Dir(path) => write!(f, "dir://{}", path.display()),
            Self::S3(options) => {
                write!(f, "s3://{}/{}", options.bucket, options.prefix)?;
                let mut pairs = Vec::new();
                if let Some(endpoint) = &options.endpoint {
                    pairs.push(("endpoint", endpoint.clone()));
                }
                if let Some(region) = &options.region {
                    pairs.push(("region", region.clone()));
                }
                if let Some(path_style) = options.path_style {
                    pairs.push(("path_style", path_style.to_string()));
                }
                if let Some(profile) = &options.profile {
                    pairs.push(("profile", profile.clone()));
                }
                if let Some(secret_file) = &options.secret_file {
                    pairs.push(("secret_file", secret_file.display().to_string()));
                }
                if options.read_timeout != DEFAULT_TIMEOUT {
                    let seconds = options.read_timeout.as_secs_f64();
                    pairs.push(("timeout", seconds.to_string()));
                }
                // Escape only what would change the query's meaning, so URLs stay readable.
                const QUERY_VALUE: &AsciiSet =
                    &CONTROLS.add(b' ').add(b'&').add(b'#').add(b'%').add(b'+');
                let query: Vec<String> = pairs
                    .iter()
                    .map(|(name, value)| {
                        format!("{name}={}", utf8_percent_encode(value, QUERY_VALUE))
                    })
                    .collect();
                let query = query.join("&");
                if query.is_empty() {
                    Ok(())
                } else {
                    write!(f, "?{query}")
                }
            }
        }
    }
}

impl StoreSpec {
    /// The spec of a folder inside this store (`folder` is a relative path without `..`):
    /// the prefix gains it for S3, the path for a dir store.
    pub fn join(&self, folder: &str) -> StoreSpec {
        let folder = folder.trim_matches('/');
        match self {
            Self::Memory => Self::Memory,
            Self::Dir(path) => Self::Dir(path.join(folder)),
            Self::S3(options) => {
                let mut options = options.clone();
                options.prefix = format!("{}{folder}/", options.prefix);
                Self::S3(options)
            }
        }
    }
}

/// Opens the store a spec names. A dir store's directory must exist; an S3 store is not contacted
/// until its first request.
pub async fn open_store(spec: &StoreSpec) -> Result<SharedStore> {
    Ok(match spec {
        StoreSpec::Memory => Arc::new(MemoryStore::new()),
        StoreSpec::Dir(path) => Arc::new(DirStore::open(path)?),
        StoreSpec::S3(options) => Arc::new(S3Store::connect(options).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_specs_carry_endpoint_region_and_style() {
        let spec: StoreSpec =
            "s3://bucket/vols/a?endpoint=http://127.0.0.1:9000&region=eu-1&path_style=false&timeout=2.5"
                .parse()
                .unwrap();
        let StoreSpec::S3(options) = &spec else {
            panic!("not s3: {spec:?}");
        };
        assert_eq!(options.bucket, "bucket");
        assert_eq!(options.prefix, "vols/a/");
        assert_eq!(options.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(options.region.as_deref(), Some("eu-1"));
        assert_eq!(options.path_style, Some(false));
        assert_eq!(options.read_timeout, std::time::Duration::from_millis(2500));
        let again: StoreSpec = spec.to_string().parse().unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn joined_specs_name_a_folder_inside() {
        let s3: StoreSpec = "s3://bucket/vols?region=eu-1".parse().unwrap();
        assert_eq!(
            s3.join("db").to_string(),
            "s3://bucket/vols/db/?region=eu-1"
        );
        let root: StoreSpec = "s3://bucket".parse().unwrap();
        assert_eq!(root.join("a/b/").to_string(), "s3://bucket/a/b/");
        let dir: StoreSpec = "dir:///srv/cairn".parse().unwrap();
        assert_eq!(dir.join("db"), StoreSpec::Dir("/srv/cairn/db".into()));
    }

    #[test]
    fn dir_and_memory_specs() {
        assert_eq!(
            "dir:///var/lib/cairn/store".parse::<StoreSpec>().unwrap(),
            StoreSpec::Dir("/var/lib/cairn/store".into())
        );
        assert_eq!("memory:".parse::<StoreSpec>().unwrap(), StoreSpec::Memory);
        assert!("dir://relative/path".parse::<StoreSpec>().is_err());
        assert!("dir:///a/../etc".parse::<StoreSpec>().is_err());
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let unknown = "s3://b?colour=red".parse::<StoreSpec>().unwrap_err();
        assert!(unknown.message().contains("colour"), "{unknown}");
        assert!(unknown.message().contains("endpoint, region"), "{unknown}");
        let secret = "s3://b?secret_access_key=x"
            .parse::<StoreSpec>()
            .unwrap_err();
        assert!(secret.message().contains("credential"), "{secret}");
        let scheme = "ftp://host/x".parse::<StoreSpec>().unwrap_err();
        assert!(scheme.message().contains("unknown store type"), "{scheme}");
        assert!("s3:///prefix".parse::<StoreSpec>().is_err());
        let timeout = "s3://b?timeout=soon".parse::<StoreSpec>().unwrap_err();
        assert!(timeout.message().contains("seconds"), "{timeout}");
    }
}
