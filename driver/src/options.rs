//! Volume options (`docker volume create -o NAME=VALUE`): which are valid, what values they take,
//! and how they become flags of the volume's `cairn mount` process.
//!
//! Options never hold secrets, since `docker volume inspect` shows them: credentials belong to the
//! store definitions in the config file.

use std::collections::BTreeMap;

/// Every option `-o` takes (README.md says what each means).
pub const VALID_OPTIONS: &[&str] = &[
    "store",
    "path",
    "access",
    "cache_size",
    "writeback_delay",
    "metadata_ttl",
    "fsync",
    "uid",
    "gid",
    "file_mode",
    "dir_mode",
];

/// The kernel's TTL for an exclusive volume's names and attributes, unless the volume says
/// otherwise. Its mount is the volume's only writer (`cairn mount --only-writer`): it keeps what
/// it learned for as long as it lives, and only tools writing to the store behind its back can
/// make that stale. A volume given `metadata_ttl` is trusted for that long instead.
pub const EXCLUSIVE_METADATA_TTL: &str = "60";

/// How hosts share a volume: `exclusive` is enforced by a lease in the store (and its mount, the
/// only writer, trusts what it learned from the store longer by default), `readonly` by
/// mounting read-only; `shared` has neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Exclusive,
    Shared,
    ReadOnly,
}

/// A volume's options, checked. Kept as the map the user gave (plus the resolved store name), so
/// that a second Create with the same options is recognised as the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    given: BTreeMap<String, String>,
}

impl VolumeOptions {
    /// Checks every option; `default_store` fills in a missing `store`.
    pub fn parse(given: &BTreeMap<String, String>, default_store: &str) -> Result<Self, String> {
        let mut checked = given.clone();
        for (name, value) in given {
            let bad = |why: &str| format!("volume option {name}={value:?} is not valid: {why}");
            match name.as_str() {
                "store" if value.is_empty() => return Err(bad("name a store from the config")),
                "store" => {}
                "path" => {
                    check_path(value).map_err(|why| bad(&why))?;
                }
                "access" => {
                    parse_access(value).map_err(|why| bad(&why))?;
                }
                "cache_size" => {
                    parse_size(value).map_err(|why| bad(&why))?;
                }
                "writeback_delay" | "metadata_ttl" => {
                    parse_seconds(value).map_err(|why| bad(&why))?;
                }
                "fsync" if value == "store" || value == "local" => {}
                "fsync" => return Err(bad("use store or local")),
                "uid" | "gid" => {
                    value
                        .parse::<u32>()
                        .map_err(|_| bad("use a numeric ID like 1000"))?;
                }
                "file_mode" | "dir_mode" => {
                    parse_octal(value).map_err(|why| bad(&why))?;
                }
                unknown => {
                    return Err(format!(
                        "unknown volume option {unknown:?}; valid options: {}",
                        VALID_OPTIONS.join(", ")
                    ));
                }
            }
        }
        checked
            .entry("store".into())
            .or_insert_with(|| default_store.to_string());
        Ok(Self { given: checked })
    }

    /// The options as stored and shown (store always present).
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.given
    }

    pub fn store(&self) -> &str {
        &self.given["store"]
    }

    /// The folder of the store the volume presents, if not its own.
    pub fn path(&self) -> Option<&str> {
        self.given.get("path").map(|p| p.trim_matches('/'))
    }

    pub fn access(&self) -> Access {
        self.given
            .get("access")
            .and_then(|a| parse_access(a).ok())
            .unwrap_or(Access::Exclusive)
    }

    /// The flags of `cairn mount` these options ask for.
    pub fn mount_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (name, value) in &self.given {
            let flag = match name.as_str() {
                "cache_size" | "writeback_delay" | "metadata_ttl" | "fsync" | "uid" | "gid"
                | "file_mode" | "dir_mode" => name.replace('_', "-"),
                _ => continue,
            };
            flags.push(format!("--{flag}"));
            flags.push(value.clone());
        }
        if self.access() == Access::Exclusive && !self.given.contains_key("metadata_ttl") {
            flags.push("--only-writer".into());
            flags.push("--metadata-ttl".into());
            flags.push(EXCLUSIVE_METADATA_TTL.into());
        }
        if self.access() == Access::ReadOnly {
            flags.push("--read-only".into());
        }
        flags
    }
}

fn parse_access(value: &str) -> Result<Access, String> {
    match value {
        "exclusive" => Ok(Access::Exclusive),
        "shared" => Ok(Access::Shared),
        "readonly" => Ok(Access::ReadOnly),
        _ => Err("use exclusive, shared or readonly".into()),
    }
}

/// A `path` option: a relative folder, no `.` or `..` segments, not cairn's own `.cairn`.
fn check_path(value: &str) -> Result<(), String> {
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty() {
        return Err("name a folder inside the store, like projects/site".into());
    }
    for segment in trimmed.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("the folder must not contain empty, '.' or '..' parts".into());
        }
        if segment.chars().any(char::is_control) {
            return Err("the folder must not contain control characters".into());
        }
    }
    if trimmed.split('/').next() == Some(".cairn") {
        return Err(".cairn holds cairn's own records".into());
    }
    Ok(())
}

/// A byte count with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?} is not a size like 512M or 10G")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size like 512M or 10G"))
}

/// A file mode in octal, like 644 or 0755.
pub fn parse_octal(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!("{text:?} is not an octal mode like 644 or 0755")),
    }
}

/// A number of seconds, 0 or more, like 2 or 0.5.
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a number of seconds, 0 or more")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Result<VolumeOptions, String> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        VolumeOptions::parse(&map, "default")
    }

    #[test]
    fn good_options_become_mount_flags() {
        let parsed = options(&[
            ("cache_size", "512M"),
            ("fsync", "local"),
            ("uid", "1000"),
            ("file_mode", "640"),
            ("access", "readonly"),
        ])
        .unwrap();
        assert_eq!(parsed.store(), "default");
        assert_eq!(parsed.access(), Access::ReadOnly);
        assert_eq!(
            parsed.mount_flags(),
            [
                "--cache-size",
                "512M",
                "--file-mode",
                "640",
                "--fsync",
                "local",
                "--uid",
                "1000",
                "--read-only"
            ]
        );
    }

    /// An exclusive volume's mount is its only writer unless the volume asks for a TTL (for a
    /// tool writing into its folder behind its back); shared and read-only volumes never are.
    #[test]
    fn an_exclusive_volume_is_mounted_as_the_only_writer_unless_given_a_ttl() {
        let only_writer = |pairs: &[(&str, &str)]| {
            let flags = options(pairs).unwrap().mount_flags();
            flags.iter().any(|f| f == "--only-writer")
        };
        assert!(only_writer(&[]));
        assert!(only_writer(&[("access", "exclusive")]));
        assert!(!only_writer(&[
            ("access", "exclusive"),
            ("metadata_ttl", "2")
        ]));
        assert!(!only_writer(&[("access", "shared")]));
        assert!(!only_writer(&[("access", "readonly")]));
    }

    #[test]
    fn an_exclusive_volume_trusts_its_metadata_longer_unless_told_otherwise() {
        let ttl_flag = |pairs: &[(&str, &str)]| {
            let flags = options(pairs).unwrap().mount_flags();
            let at = flags.iter().position(|f| f == "--metadata-ttl")?;
            Some(flags[at + 1].clone())
        };
        assert_eq!(ttl_flag(&[]).as_deref(), Some(EXCLUSIVE_METADATA_TTL));
        assert_eq!(ttl_flag(&[("access", "exclusive")]).as_deref(), Some("60"));
        assert_eq!(ttl_flag(&[("access", "shared")]), None);
        assert_eq!(ttl_flag(&[("access", "readonly")]), None);
        let told = [("access", "exclusive"), ("metadata_ttl", "0.5")];
        assert_eq!(ttl_flag(&told).as_deref(), Some("0.5"));
        assert_eq!(
            ttl_flag(&[("access", "shared"), ("metadata_ttl", "10")]).as_deref(),
            Some("10")
        );
    }

    #[test]
    fn bad_options_name_themselves_and_the_valid_ones() {
        let unknown = options(&[("colour", "red")]).unwrap_err();
        assert!(unknown.contains("\"colour\""), "{unknown}");
        assert!(
            unknown.contains("cache_size") && unknown.contains("access"),
            "{unknown}"
        );
        for (name, value) in [
            ("cache_size", "lots"),
            ("fsync", "sometimes"),
            ("uid", "-1"),
            ("file_mode", "999"),
            ("writeback_delay", "-2"),
            ("metadata_ttl", "soon"),
            ("access", "everyone"),
            ("path", "../other"),
            ("path", "a//b"),
            ("path", ".cairn/volumes"),
            ("store", ""),
        ] {
            let err = options(&[(name, value)]).unwrap_err();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert!(parse_size("5X").is_err());
        assert_eq!(parse_octal("0755"), Ok(0o755));
        assert!(parse_octal("17777").is_err());
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("NaN").is_err());
    }
}
