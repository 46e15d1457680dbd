//! POSIX attributes as object metadata, in the convention s3fs set and rclone follows:
//! `mode` (decimal st_mode, type bits included), `uid`, `gid` and `mtime` (decimal seconds;
//! rclone writes a fraction, s3fs a whole number). Objects with no such metadata get the
//! mount's defaults.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::Metadata;

pub const S_IFMT: u32 = libc::S_IFMT;
pub const S_IFREG: u32 = libc::S_IFREG;
pub const S_IFDIR: u32 = libc::S_IFDIR;
pub const S_IFLNK: u32 = libc::S_IFLNK;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn type_bits(self) -> u32 {
        match self {
            Self::File => S_IFREG,
            Self::Dir => S_IFDIR,
            Self::Symlink => S_IFLNK,
        }
    }
}

/// What the mount shows for objects that carry no attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of files (0o644 unless told).
    pub file_mode: u32,
    /// Permission bits of directories (0o755 unless told).
    pub dir_mode: u32,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        }
    }
}

/// The attributes stored with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// Full st_mode: type bits and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// As set by `utimensat`; None: the mtime is shown (the mount is `noatime`).
    pub atime: Option<SystemTime>,
    /// A device node's device number (0 for everything else).
    pub rdev: u32,
}

impl Attrs {
    pub fn kind(&self) -> Kind {
        match self.mode & S_IFMT {
            S_IFDIR => Kind::Dir,
            S_IFLNK => Kind::Symlink,
            _ => Kind::File,
        }
    }

    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }

    /// Reads attributes from metadata; what is missing comes from `defaults`, the object's
    /// last-modified time, and `kind` (what the key's shape says the object is).
    pub fn decode(
        metadata: &Metadata,
        kind: Kind,
        last_modified: SystemTime,
        defaults: &Defaults,
    ) -> Self {
        let number = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        let default_perm = match kind {
            Kind::Dir => defaults.dir_mode,
            Kind::File => defaults.file_mode,
            Kind::Symlink => 0o777,
        };
        let mode = match number("mode") {
            // Some writers store permission bits only: the key's shape gives the type.
            Some(mode) if mode & S_IFMT == 0 => kind.type_bits() | (mode & 0o7777),
            // A marker `dir/` is a directory whatever its mode says, and a plain key is not.
            Some(mode) if kind == Kind::Dir && mode & S_IFMT != S_IFDIR => {
                S_IFDIR | (mode & 0o7777)
            }
            Some(mode) if kind != Kind::Dir && mode & S_IFMT == S_IFDIR => {
                S_IFREG | (mode & 0o7777)
            }
            Some(mode) => mode,
            None => kind.type_bits() | default_perm,
        };
        Self {
            mode,
            uid: number("uid").unwrap_or(defaults.uid),
            gid: number("gid").unwrap_or(defaults.gid),
            mtime: metadata
                .get("mtime")
                .and_then(|v| parse_seconds(v))
                .unwrap_or(last_modified),
            atime: metadata.get("atime").and_then(|v| parse_seconds(v)),
            rdev: number("rdev").unwrap_or(0),
        }
    }

    /// The access time shown: as set, or the mtime.
    pub fn shown_atime(&self) -> SystemTime {
        self.atime.unwrap_or(self.mtime)
    }

    /// The metadata that carries these attributes (s3fs and rclone read it back).
    pub fn encode(&self) -> Metadata {
        let seconds = |at: SystemTime| at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        [
            ("mode", self.mode.to_string()),
            ("uid", self.uid.to_string()),
            ("gid", self.gid.to_string()),
            ("mtime", seconds(self.mtime).to_string()),
        ]
        .into_iter()
        .chain(self.atime.map(|at| ("atime", seconds(at).to_string())))
        .chain((self.rdev != 0).then(|| ("rdev", self.rdev.to_string())))
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Parses decimal seconds since the epoch, whole (`1700000000`) or with a fraction
/// (`1700000000.123456789`), without the rounding of a float.
pub fn parse_seconds(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: u64 = whole.parse().ok()?;
    let digits: String = fraction.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse::<u32>().ok()?
    };
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_what_s3fs_writes() {
        // s3fs: a file chmod 640 owned by 1000:1000, and a directory marker.
        let file = Attrs::decode(
            &meta(&[
                ("mode", "33184"),
                ("uid", "1000"),
                ("gid", "1000"),
                ("mtime", "1700000000"),
            ]),
            Kind::File,
            UNIX_EPOCH,
            &Defaults::default(),
        );
        assert_eq!(file.mode, S_IFREG | 0o640);
        assert_eq!((file.uid, file.gid), (1000, 1000));
        assert_eq!(file.mtime, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let dir = Attrs::decode(
            &meta(&[("mode", "493")]),
            Kind::Dir,
            UNIX_EPOCH,
            &Defaults::default(),
        );
        assert_eq!(dir.mode, S_IFDIR | 0o755);
    }

    #[test]
    fn reads_rclone_fractional_mtime_exactly() {
        let attrs = Attrs::decode(
            &meta(&[("mtime", "1700000000.123456789")]),
            Kind::File,
            UNIX_EPOCH,
            &Defaults::default(),
        );
        assert_eq!(
            attrs.mtime,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
        );
        assert_eq!(
            parse_seconds("12.5"),
            Some(UNIX_EPOCH + Duration::new(12, 500_000_000))
        );
        assert_eq!(parse_seconds("nope"), None);
    }

    #[test]
    fn objects_without_metadata_get_the_defaults() {
        let defaults = Defaults {
            uid: 7,
            gid: 8,
            file_mode: 0o600,
            dir_mode: 0o700,
        };
        let modified = UNIX_EPOCH + Duration::from_secs(5);
        let file = Attrs::decode(&Metadata::new(), Kind::File, modified, &defaults);
        assert_eq!(
            (file.mode, file.uid, file.gid, file.mtime),
            (S_IFREG | 0o600, 7, 8, modified)
        );
        let dir = Attrs::decode(&Metadata::new(), Kind::Dir, modified, &defaults);
        assert_eq!(dir.mode, S_IFDIR | 0o700);
    }

    #[test]
    fn round_trips_through_metadata() {
        let attrs = Attrs {
            mode: S_IFLNK | 0o777,
            uid: 1,
            gid: 2,
            mtime: UNIX_EPOCH + Duration::from_secs(99),
            atime: Some(UNIX_EPOCH + Duration::from_secs(7)),
            rdev: 0,
        };
        let back = Attrs::decode(
            &attrs.encode(),
            Kind::File,
            UNIX_EPOCH,
            &Defaults::default(),
        );
        assert_eq!(back, attrs);
        assert_eq!(back.kind(), Kind::Symlink);
    }
}
