//! Newtypes for the identifiers Docker sends: volume names and mount IDs. Checking them here,
//! once, is what keeps a client from naming a path outside the volume's folders or prefix.

use std::fmt;

/// The longest volume name cairn takes (Docker's own anonymous names are 64 characters).
pub const MAX_VOLUME_NAME: usize = 128;
/// The longest mount ID cairn takes (Docker's are 64 hex digits).
pub const MAX_MOUNT_ID: usize = 256;

/// A volume name by Docker's rule: a letter or digit, then letters, digits, `_`, `.` or `-`, two
/// characters at least. So it never is `.` or `..`, holds no `/`, and is safe as a path segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(name: &str) -> Result<Self, String> {
        let valid_start = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let valid_rest = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if name.len() < 2 || name.len() > MAX_VOLUME_NAME || !valid_start || !valid_rest {
            return Err(format!(
                "invalid volume name {name:?}: use 2 to {MAX_VOLUME_NAME} characters, letters, \
                 digits, '_', '.' or '-', starting with a letter or digit"
            ));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The ID Docker gives each use of a volume (one per container mount). Only ever stored in the
/// registry, never used in a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MountId(String);

impl MountId {
    pub fn parse(id: &str) -> Result<Self, String> {
        if id.is_empty() || id.len() > MAX_MOUNT_ID || id.chars().any(char::is_control) {
            return Err(format!(
                "invalid mount ID {id:?}: expected 1 to {MAX_MOUNT_ID} printable characters"
            ));
        }
        Ok(Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_follow_dockers_rule() {
        for good in ["db", "my-vol_1.data", "0abc", &"a".repeat(MAX_VOLUME_NAME)] {
            assert!(VolumeName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            ".hidden",
            "..",
            "a/b",
            "../etc",
            "-x",
            "sp ace",
            "é-accent",
            &"a".repeat(MAX_VOLUME_NAME + 1),
        ] {
            let err = VolumeName::parse(bad).unwrap_err();
            assert!(err.contains("invalid volume name"), "{bad}: {err}");
        }
    }

    #[test]
    fn mount_ids_are_printable() {
        assert!(MountId::parse("3f2a").is_ok());
        assert!(MountId::parse("").is_err());
        assert!(MountId::parse("a\nb").is_err());
        assert!(MountId::parse(&"x".repeat(MAX_MOUNT_ID + 1)).is_err());
    }
}
