//! The daemon's configuration, /etc/cairn/config.toml: where the socket is and which stores
//! volumes may live in. Every setting has a default, so no file is needed: without one, the only
//! store is the embedded dir store under the state directory.
//!
//! ```toml
//! socket = "/run/docker/plugins/cairn.sock"
//! default_store = "s3"
//! host_id = "web-1"      # default: the hostname
//! lease_ttl = 30         # seconds
//! mounts_dir = "/var/lib/cairn/mounts"  # where volumes are mounted (the default)
//! metrics_address = "127.0.0.1:9108"   # GET /metrics for Prometheus; off without it
//!
//! [stores.s3]
//! spec = "s3://my-bucket/volumes?region=eu-west-1&secret_file=/etc/cairn/s3.secret"
//!
//! [stores.nfs]
//! spec = "dir:///mnt/efs/cairn"
//! shared = true
//!
//! [stores.nfs.defaults]  # volume options for volumes of this store created without them
//! access = "shared"
//! writeback_delay = 0
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config file is looked for.
pub const DEFAULT_CONFIG: &str = "/etc/cairn/config.toml";
/// Where Docker looks for the plugin: the socket's file name is the driver's name.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/cairn.sock";
/// The name of the store that is there without configuration.
pub const EMBEDDED_STORE: &str = "default";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The unix socket Docker talks to.
    pub socket: PathBuf,
    /// The store of volumes created without `-o store=`.
    pub default_store: String,
    /// Named stores volumes can live in.
    pub stores: BTreeMap<String, StoreConfig>,
    /// This host's name in leases, errors and status. Default: the hostname.
    pub host_id: Option<String>,
    /// Seconds an exclusive volume's lease lasts without renewal: after a host dies, another
    /// may take its volumes over this long after its last renewal.
    pub lease_ttl: u64,
    /// Where `GET /metrics` answers for Prometheus; no metrics endpoint without it.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Where volumes are mounted, one folder each. Default: STATE_DIR/mounts.
    pub mounts_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// A store spec, as `cairn store check` takes it.
    pub spec: String,
    /// Whether several hosts use this store (then Docker is told the volumes are global).
    /// Default: true for s3 stores, false for dir stores.
    pub shared: Option<bool>,
    /// Volume options a volume of this store gets when its Create does not give them (any
    /// option but `store` and `path`).
    #[serde(default)]
    pub defaults: BTreeMap<String, OptionValue>,
}

/// A default volume option as TOML has it: text, or a number (`writeback_delay = 0`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl StoreConfig {
    /// The store's default volume options, as volume options are given.
    pub fn default_options(&self) -> BTreeMap<String, String> {
        let text = |value: &OptionValue| match value {
            OptionValue::Text(text) => text.clone(),
            OptionValue::Integer(number) => number.to_string(),
            OptionValue::Float(number) => number.to_string(),
        };
        self.defaults
            .iter()
            .map(|(name, value)| (name.clone(), text(value)))
            .collect()
    }

    /// Checks the defaults as volume options.
    fn check_defaults(&self, store: &str) -> Result<(), String> {
        let defaults = self.default_options();
        for fixed in ["store", "path"] {
            if defaults.contains_key(fixed) {
                return Err(format!(
                    "store {store}: `{fixed}` cannot be a default volume option (it is the \
                     volume's own choice)"
                ));
            }
        }
        crate::options::VolumeOptions::parse(&defaults, store)
            .map(|_| ())
            .map_err(|why| format!("store {store}: its defaults: {why}"))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            default_store: EMBEDDED_STORE.into(),
            stores: BTreeMap::new(),
            host_id: None,
            lease_ttl: 30,
            metrics_address: None,
            mounts_dir: None,
        }
    }
}

impl Config {
    /// Reads the config file at `path`. A missing file means the defaults, unless `required`
    /// (the user named the file).
    pub fn load(path: &Path, required: bool) -> Result<Self, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(err) => {
                return Err(format!(
                    "cannot read the config file {}: {err}",
                    path.display()
                ));
            }
        };
        Self::parse(&text).map_err(|why| format!("config file {}: {why}", path.display()))
    }

    /// The named file (which must exist), or else /etc/cairn/config.toml if there is one.
    pub fn load_named_or_default(named: Option<&Path>) -> Result<Self, String> {
        match named {
            Some(path) => Self::load(path, true),
            None => Self::load(Path::new(DEFAULT_CONFIG), false),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|err| err.to_string())?;
        for (name, store) in &config.stores {
            store.check_defaults(name)?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_means_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn stores_are_named() {
        let config = Config::parse(
            "default_store = \"s3\"\n[stores.s3]\nspec = \"s3://b/p\"\n\
             [stores.nfs]\nspec = \"dir:///mnt/nfs\"\nshared = true\n",
        )
        .unwrap();
        assert_eq!(config.default_store, "s3");
        assert_eq!(config.stores["s3"].spec, "s3://b/p");
        assert_eq!(config.stores["nfs"].shared, Some(true));
    }

    #[test]
    fn typos_are_errors() {
        let err = Config::parse("sockett = \"/x\"").unwrap_err();
        assert!(err.contains("sockett"), "{err}");
        let err = Config::parse("[stores.a]\nspec = \"dir:///x\"\nshare = true").unwrap_err();
        assert!(err.contains("share"), "{err}");
    }

    #[test]
    fn a_store_sets_default_volume_options_checked_as_volume_options() {
        let config = Config::parse(
            "[stores.g]\nspec = \"s3://b/p\"\n[stores.g.defaults]\naccess = \"shared\"\n\
             writeback_delay = 0\nmetadata_ttl = 0.5\n",
        )
        .unwrap();
        let defaults = config.stores["g"].default_options();
        assert_eq!(defaults["access"], "shared");
        assert_eq!(defaults["writeback_delay"], "0");
        assert_eq!(defaults["metadata_ttl"], "0.5");
        let bad = |toml: &str| {
            Config::parse(&format!(
                "[stores.g]\nspec = \"s3://b/p\"\n[stores.g.defaults]\n{toml}"
            ))
            .unwrap_err()
        };
        let err = bad("access = \"sometimes\"");
        assert!(err.contains("store g") && err.contains("access"), "{err}");
        let err = bad("path = \"shared/data\"");
        assert!(
            err.contains("path") && err.contains("cannot be a default"),
            "{err}"
        );
        let err = bad("colour = \"blue\"");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn a_missing_file_is_fine_unless_named() {
        let missing = Path::new("/nonexistent/cairn.toml");
        assert_eq!(Config::load(missing, false).unwrap(), Config::default());
        assert!(
            Config::load(missing, true)
                .unwrap_err()
                .contains("cannot read")
        );
    }
}
