//! File names: what a name may be (`check_name` for any name asked about, `check_new_name` for
//! a name cairn will store), and the store key of a name in a directory (which must fit S3's
//! key limit). Pure functions, no state.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::Filesystem;
use crate::attrs::Kind;
use crate::error::{FsError, FsResult};
use crate::fs::Namespace;
use crate::store::MAX_KEY_LEN;

/// The longest file name, in bytes.
pub const NAME_MAX: usize = 255;

pub(super) fn check_name(name: &OsStr) -> FsResult<String> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong(format!("{} bytes", name.len())));
    }
    let text = std::str::from_utf8(name.as_bytes())
        .map_err(|_| FsError::Invalid("file names must be valid UTF-8".into()))?;
    if text.is_empty() || text == "." || text == ".." || text.contains('/') || text.contains('\0') {
        return Err(FsError::Invalid(format!("{text:?} is not a file name")));
    }
    Ok(text.to_string())
}

/// A name for something new: also no control characters, which S3 listings cannot carry
/// reliably (and some S3 servers refuse in keys).
pub(super) fn check_new_name(name: &OsStr) -> FsResult<String> {
    let text = check_name(name)?;
    if text.chars().any(|c| c.is_ascii_control()) {
        return Err(FsError::Invalid(format!(
            "{text:?}: names with control characters (newline, tab...) are not stored"
        )));
    }
    Ok(text)
}

impl Filesystem {
    /// The key of `name` in directory `parent`.
    pub(super) fn child_key(ns: &Namespace, parent: u64, name: &str) -> FsResult<String> {
        let parent_inode = ns.get(parent).ok_or(FsError::NotFound)?;
        if parent_inode.kind() != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let prefix = ns.dir_prefix(parent).ok_or(FsError::NotFound)?;
        let key = format!("{prefix}{name}");
        // Room for the `/` of a directory marker too.
        if key.len() + 1 > MAX_KEY_LEN {
            return Err(FsError::NameTooLong(format!(
                "the path is over {MAX_KEY_LEN} bytes"
            )));
        }
        Ok(key)
    }
}
