//! Odd names inside a volume, through a real FUSE mount on S3 and on the dir store: backslashes,
//! percent signs, names like the dir store's own bookkeeping (`.m`, `.tmp`, `.lock`, `%`) or
//! cairn's (`.cairn`), unicode. Each is its own file, the listing shows exactly them, the store
//! holds exactly their keys, and all of it survives a remount with an empty cache. Names that are
//! not UTF-8 or hold control characters are refused.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::common::{Direct, Volume};

const NAMES: &[&str] = &[
    "back\\slash",
    "100%",
    "%2F",
    "%",
    ".cairn",
    ".m",
    ".tmp",
    ".lock",
    ".uploads",
    "sp ace",
    "ünïcödé",
    "emoji😀",
    "a:b?c=d&e#f",
    "+plus~tilde",
];

fn listing(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn check(mut volume: Volume) {
    std::fs::create_dir(volume.path("sub")).unwrap();
    std::fs::create_dir(volume.path(".m-dir")).unwrap();
    for name in NAMES {
        std::fs::write(volume.path(name), format!("root {name}")).unwrap();
        std::fs::write(volume.path("sub").join(name), format!("sub {name}")).unwrap();
    }
    std::fs::write(volume.path(".m-dir/inside"), b"inside").unwrap();
    // Not UTF-8, or with control characters: refused, and nothing is made.
    let invalid = volume.path("").join(OsStr::from_bytes(b"bad\xffutf8"));
    assert_eq!(
        crate::common::errno(std::fs::write(&invalid, b"x")),
        libc::EINVAL
    );
    for control in ["new\nline", "tab\tname", "bell\u{7}"] {
        let file = std::fs::write(volume.path(control), b"x");
        assert_eq!(crate::common::errno(file), libc::EINVAL, "{control:?}");
        assert_eq!(
            crate::common::errno(std::fs::create_dir(volume.path(control))),
            libc::EINVAL
        );
    }

    let mut want: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    want.extend(["sub".to_string(), ".m-dir".to_string()]);
    for round in ["warm", "after a cold remount"] {
        assert_eq!(listing(&volume.mountpoint), want, "{round}");
        let sub: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
        assert_eq!(listing(&volume.path("sub")), sub, "{round}");
        for name in NAMES {
            assert_eq!(
                std::fs::read_to_string(volume.path(name)).unwrap(),
                format!("root {name}")
            );
            let inner = std::fs::read_to_string(volume.path("sub").join(name)).unwrap();
            assert_eq!(inner, format!("sub {name}"), "{round}");
        }
        assert_eq!(
            std::fs::read(volume.path(".m-dir/inside")).unwrap(),
            b"inside"
        );
        volume.remount_cold(&["--writeback-delay", "0"]);
    }

    let mut keys: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    keys.extend(NAMES.iter().map(|n| format!("sub/{n}")));
    keys.extend([
        "sub/".to_string(),
        ".m-dir/".to_string(),
        ".m-dir/inside".to_string(),
    ]);
    let stored: BTreeSet<String> = Direct::new(&volume.spec).keys("").into_iter().collect();
    assert_eq!(
        stored, keys,
        "the store holds exactly these keys, under the volume's prefix"
    );
}

#[test]
fn odd_names_on_s3() {
    check(Volume::new(&["--writeback-delay", "0"]));
}

#[test]
fn odd_names_on_the_dir_store() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("dir://{}", dir.path().display());
    check(Volume::mount(&spec, &["--writeback-delay", "0"]));
}
