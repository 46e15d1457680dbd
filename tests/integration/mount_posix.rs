//! POSIX operations through a real FUSE mount of `cairn mount` over a real S3 server (moto over
//! HTTP): each operation, its errors as a program sees them, and what reaches the store.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Volume, errno};

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn files_round_trip_and_reach_the_store_with_attributes() {
    let volume = Volume::new(&[]);
    fs::write(volume.path("hello.txt"), b"hello, cairn\n").unwrap();
    assert_eq!(read(&volume.path("hello.txt")), b"hello, cairn\n");
    volume.flush();
    let (metadata, body) = volume
        .direct()
        .get(&volume.key("hello.txt"))
        .expect("the object");
    assert_eq!(body, b"hello, cairn\n");
    let mode: u32 = metadata["mode"].parse().unwrap();
    assert_eq!(
        mode & 0o170000,
        0o100000,
        "a regular file's mode: {metadata:?}"
    );
    assert_eq!(metadata["uid"], "0");
}

#[test]
fn overwrite_in_the_middle_append_and_o_append() {
    let volume = Volume::new(&[]);
    let path = volume.path("f");
    fs::write(&path, b"0123456789").unwrap();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.seek(SeekFrom::Start(3)).unwrap();
    file.write_all(b"XY").unwrap();
    drop(file);
    assert_eq!(read(&path), b"012XY56789");
    let mut append = OpenOptions::new().append(true).open(&path).unwrap();
    append.write_all(b"++").unwrap();
    // O_APPEND writes land at the end even after a seek.
    append.seek(SeekFrom::Start(0)).unwrap();
    append.write_all(b"!").unwrap();
    drop(append);
    assert_eq!(read(&path), b"012XY56789++!");
    volume.flush();
    assert_eq!(
        volume.direct().get(&volume.key("f")).unwrap().1,
        b"012XY56789++!"
    );
}

#[test]
fn o_trunc_and_o_excl() {
    let volume = Volume::new(&[]);
    let path = volume.path("f");
    fs::write(&path, b"long contents").unwrap();
    let excl = OpenOptions::new().write(true).create_new(true).open(&path);
    assert_eq!(errno(excl), libc::EEXIST);
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(b"short").unwrap();
    drop(file);
    assert_eq!(read(&path), b"short");
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    volume.flush();
    assert_eq!(volume.direct().get(&volume.key("f")).unwrap().1, b"");
}

#[test]
fn writes_past_the_end_leave_a_hole_of_zeros() {
    let volume = Volume::new(&[]);
    let path = volume.path("sparse");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"head").unwrap();
    file.seek(SeekFrom::Start(100_000)).unwrap();
    file.write_all(b"tail").unwrap();
    drop(file);
    let contents = read(&path);
    assert_eq!(contents.len(), 100_004);
    assert_eq!(&contents[..4], b"head");
    assert!(contents[4..100_000].iter().all(|b| *b == 0));
    assert_eq!(&contents[100_000..], b"tail");
}

#[test]
fn truncate_grows_and_shrinks() {
    let mut volume = Volume::new(&[]);
    let path = volume.path("t");
    fs::write(&path, b"abcdefghij").unwrap();
    // truncate(2) by path, with no open file: the change must still reach the store.
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::truncate(c_path.as_ptr(), 4) }, 0);
    assert_eq!(read(&path), b"abcd");
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(8).unwrap();
    drop(file);
    assert_eq!(read(&path), b"abcd\0\0\0\0");
    volume.remount_cold(&[]);
    assert_eq!(read(&volume.path("t")), b"abcd\0\0\0\0");
}

#[test]
fn fsync_makes_the_data_durable_in_the_store_while_the_file_stays_open() {
    let volume = Volume::new(&[]);
    let mut file = File::create(volume.path("journal")).unwrap();
    file.write_all(b"committed").unwrap();
    file.sync_all().unwrap();
    assert_eq!(
        volume.direct().get(&volume.key("journal")).unwrap().1,
        b"committed"
    );
    file.write_all(b" and more").unwrap();
    file.sync_data().unwrap();
    assert_eq!(
        volume.direct().get(&volume.key("journal")).unwrap().1,
        b"committed and more"
    );
}

#[test]
fn unlink_mkdir_rmdir_and_their_errors() {
    let mut volume = Volume::new(&[]);
    assert_eq!(errno(fs::remove_file(volume.path("missing"))), libc::ENOENT);
    fs::create_dir(volume.path("d")).unwrap();
    assert_eq!(errno(fs::create_dir(volume.path("d"))), libc::EEXIST);
    assert_eq!(errno(fs::remove_file(volume.path("d"))), libc::EISDIR);
    fs::write(volume.path("d/f"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(volume.path("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_dir(volume.path("d/f"))), libc::ENOTDIR);
    assert_eq!(errno(fs::create_dir(volume.path("nope/sub"))), libc::ENOENT);
    fs::remove_file(volume.path("d/f")).unwrap();
    assert!(!volume.path("d/f").exists());
    volume.flush();
    assert_eq!(volume.direct().get(&volume.key("d/f")), None);
    // An empty directory persists (its marker), and goes with rmdir.
    fs::create_dir(volume.path("empty")).unwrap();
    volume.remount_cold(&[]);
    assert!(volume.path("empty").is_dir());
    assert!(volume.path("d").is_dir());
    fs::remove_dir(volume.path("d")).unwrap();
    assert!(!volume.path("d").exists());
    volume.flush();
    assert!(volume.direct().keys(&volume.key("d/")).is_empty());
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes()).unwrap();
    let to = CString::new(to.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings; AT_FDCWD with absolute paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn rename_files_and_directories() {
    let mut volume = Volume::new(&[]);
    fs::create_dir_all(volume.path("a/deep/er")).unwrap();
    fs::create_dir(volume.path("b")).unwrap();
    fs::write(volume.path("a/one"), b"1").unwrap();
    fs::write(volume.path("a/deep/er/two"), b"2").unwrap();
    fs::write(volume.path("b/three"), b"3").unwrap();

    // Across directories, and over an existing file.
    fs::rename(volume.path("a/one"), volume.path("b/three")).unwrap();
    assert_eq!(read(&volume.path("b/three")), b"1");
    assert!(!volume.path("a/one").exists());
    // RENAME_NOREPLACE refuses to replace.
    fs::write(volume.path("b/four"), b"4").unwrap();
    let refused = renameat2(
        &volume.path("b/four"),
        &volume.path("b/three"),
        libc::RENAME_NOREPLACE,
    );
    assert_eq!(errno(refused), libc::EEXIST);
    renameat2(
        &volume.path("b/four"),
        &volume.path("b/five"),
        libc::RENAME_NOREPLACE,
    )
    .unwrap();
    // A file over a directory, a directory over a file, a directory over a non-empty one.
    assert_eq!(
        errno(fs::rename(volume.path("b/five"), volume.path("a"))),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs::rename(volume.path("a"), volume.path("b/five"))),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::rename(volume.path("a"), volume.path("b"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(fs::rename(volume.path("missing"), volume.path("x"))),
        libc::ENOENT
    );

    // A whole directory, with its subtree.
    fs::rename(volume.path("a"), volume.path("moved")).unwrap();
    assert_eq!(read(&volume.path("moved/deep/er/two")), b"2");
    assert!(!volume.path("a").exists());
    volume.remount_cold(&[]);
    assert_eq!(read(&volume.path("moved/deep/er/two")), b"2");
    assert!(volume.path("moved/deep/er").is_dir());
    assert!(!volume.path("a").exists());
    let store = volume.direct();
    assert!(
        store.keys(&volume.key("a/")).is_empty(),
        "the old tree is gone from the store"
    );
    assert_eq!(read(&volume.path("b/five")), b"4");
}

#[test]
fn symlinks() {
    let mut volume = Volume::new(&[]);
    fs::write(volume.path("target.txt"), b"pointed at").unwrap();
    std::os::unix::fs::symlink("target.txt", volume.path("link")).unwrap();
    assert_eq!(
        fs::read_link(volume.path("link")).unwrap(),
        Path::new("target.txt")
    );
    assert_eq!(read(&volume.path("link")), b"pointed at");
    assert!(
        fs::symlink_metadata(volume.path("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let exists = std::os::unix::fs::symlink("x", volume.path("link"));
    assert_eq!(errno(exists), libc::EEXIST);
    volume.remount_cold(&[]);
    assert_eq!(
        fs::read_link(volume.path("link")).unwrap(),
        Path::new("target.txt")
    );
}

#[test]
fn chmod_chown_and_utimens_persist_atime_too() {
    let mut volume = Volume::new(&[]);
    let path = volume.path("owned");
    fs::write(&path, b"x").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&path, Some(1234), Some(5678)).unwrap();
    let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let accessed = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let times = fs::FileTimes::new()
        .set_modified(when)
        .set_accessed(accessed);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_times(times)
        .unwrap();
    assert_eq!(fs::metadata(&path).unwrap().accessed().unwrap(), accessed);
    fs::create_dir(volume.path("dir")).unwrap();
    fs::set_permissions(volume.path("dir"), fs::Permissions::from_mode(0o750)).unwrap();

    volume.remount_cold(&[]);
    let meta = fs::metadata(volume.path("owned")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(
        meta.accessed().unwrap(),
        accessed,
        "atime as utimensat set it"
    );
    assert_eq!(
        fs::metadata(volume.path("dir")).unwrap().mode() & 0o7777,
        0o750
    );
    let (metadata, _) = volume.direct().get(&volume.key("owned")).unwrap();
    assert_eq!(
        metadata["mode"],
        (0o100640).to_string(),
        "s3fs-style decimal mode"
    );
    assert_eq!(metadata["mtime"], "1700000000");
    assert_eq!(metadata["atime"], "1600000000", "s3fs's atime");
    // A file whose atime was never set shows its mtime there (the mount is noatime).
    fs::write(volume.path("plain"), b"y").unwrap();
    let plain = fs::metadata(volume.path("plain")).unwrap();
    assert_eq!(plain.accessed().unwrap(), plain.modified().unwrap());
}

#[test]
fn permissions_follow_the_mode_bits_for_other_users() {
    let volume = Volume::new(&[]);
    fs::write(volume.path("secret"), b"root only").unwrap();
    fs::set_permissions(volume.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(volume.path("public"), b"everyone").unwrap();
    let as_nobody = |path: &Path| {
        Command::new("cat")
            .arg(path)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let denied = as_nobody(&volume.path("secret"));
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Permission denied"));
    let allowed = as_nobody(&volume.path("public"));
    assert_eq!(
        allowed.stdout, b"everyone",
        "allow_other lets other users in"
    );
}

#[test]
fn statfs_answers() {
    let volume = Volume::new(&[]);
    let path = CString::new(volume.mountpoint.as_os_str().as_bytes()).unwrap();
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stats) }, 0);
    assert!(stats.f_bavail > 0, "the volume reports free space");
    assert_eq!(stats.f_namemax, 255);
}

#[test]
fn names_and_paths_over_the_limits() {
    let volume = Volume::new(&[]);
    let long_name = "n".repeat(256);
    assert_eq!(
        errno(fs::write(volume.path(&long_name), b"x")),
        libc::ENAMETOOLONG
    );
    fs::write(volume.path(&"n".repeat(255)), b"x").unwrap();
    // Nest directories until the key passes the store's 1024 bytes.
    let mut dir = volume.mountpoint.clone();
    for i in 0..4 {
        dir = dir.join(format!("{i}{}", "d".repeat(200)));
        fs::create_dir(&dir).unwrap();
    }
    assert_eq!(
        errno(fs::write(dir.join("f".repeat(250)), b"x")),
        libc::ENAMETOOLONG
    );
}

#[test]
fn hard_links_are_not_supported() {
    let volume = Volume::new(&[]);
    fs::write(volume.path("f"), b"x").unwrap();
    assert_eq!(
        errno(fs::hard_link(volume.path("f"), volume.path("g"))),
        libc::EOPNOTSUPP
    );
}

#[test]
fn large_directories_list_fully() {
    let volume = Volume::new(&[]);
    let store = volume.direct();
    let keys: Vec<String> = (0..2500)
        .map(|i| volume.key(&format!("big/f{i:05}")))
        .collect();
    store.put_many(keys);
    let mut names: Vec<String> = fs::read_dir(volume.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2500);
    assert_eq!(names[0], "f00000");
    assert_eq!(names[2499], "f02499");
    // `ls -l`: every entry stats (readdirplus answers them).
    let sizes: u64 = fs::read_dir(volume.path("big"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(sizes, 2500 * volume.key("big/f00000").len() as u64);
}

#[test]
fn changes_by_others_appear_within_the_metadata_ttl() {
    let volume = Volume::new(&["--metadata-ttl", "1"]);
    let store = volume.direct();
    fs::write(volume.path("shared.txt"), b"version 1").unwrap();
    assert_eq!(read(&volume.path("shared.txt")), b"version 1");
    // Once this mount's own change is in the store, the store's newer versions win.
    volume.flush();
    store.put(
        &volume.key("shared.txt"),
        b"version 2, longer",
        Default::default(),
    );
    store.put(&volume.key("new-from-elsewhere"), b"hi", Default::default());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(read(&volume.path("shared.txt")), b"version 2, longer");
    assert_eq!(read(&volume.path("new-from-elsewhere")), b"hi");
    let listed: Vec<String> = fs::read_dir(&volume.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        listed.contains(&"new-from-elsewhere".to_string()),
        "{listed:?}"
    );
    store.delete(&volume.key("shared.txt"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!volume.path("shared.txt").exists());
}

#[test]
fn a_read_only_mount_refuses_writes() {
    let volume = Volume::new(&[]);
    let spec = volume.spec.clone();
    let store = volume.direct();
    store.put(&volume.key("kept"), b"data", Default::default());
    let read_only = Volume::mount(&spec, &["--read-only"]);
    assert_eq!(read(&read_only.path("kept")), b"data");
    assert_eq!(errno(fs::write(read_only.path("new"), b"x")), libc::EROFS);
    assert_eq!(errno(fs::remove_file(read_only.path("kept"))), libc::EROFS);
    assert_eq!(errno(fs::create_dir(read_only.path("d"))), libc::EROFS);
}

#[test]
fn large_files_upload_in_parts_and_read_back_cold() {
    let mut volume = Volume::new(&[]);
    let data: Vec<u8> = (0..40 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(volume.path("big.bin"), &data).unwrap();
    volume.remount_cold(&[]);
    let mut back = Vec::new();
    File::open(volume.path("big.bin"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "40 MiB read back cold differs");
    let (_, stored) = volume.direct().get(&volume.key("big.bin")).unwrap();
    assert!(stored == data, "the stored object differs");
}

#[test]
fn unmounting_from_outside_ends_the_process_cleanly() {
    let mut volume = Volume::new(&[]);
    fs::write(volume.path("f"), b"kept").unwrap();
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&volume.mountpoint)
        .status()
        .unwrap();
    assert!(status.success());
    let output = volume.wait_exit();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(volume.direct().get(&volume.key("f")).unwrap().1, b"kept");
}

#[test]
fn mtime_of_written_files_is_recent() {
    let volume = Volume::new(&[]);
    let before = SystemTime::now() - Duration::from_secs(5);
    fs::write(volume.path("f"), b"x").unwrap();
    let mtime = fs::metadata(volume.path("f")).unwrap().modified().unwrap();
    assert!(mtime > before);
}

/// A FIFO, a unix socket and a device node live in the volume as on a local disk (`nodev`):
/// the kernel does the rendezvous, cairn keeps their names, types, modes and device numbers,
/// and a fresh mount of the store finds them again; the store holds s3fs's convention.
#[test]
fn fifos_sockets_and_device_nodes_live_in_the_volume() {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    let mut volume = Volume::new(&[]);
    let fifo = volume.path("fifo");
    let c_fifo = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o640) }, 0);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::write(fifo, b"through the fifo").unwrap())
    };
    assert_eq!(fs::read(&fifo).unwrap(), b"through the fifo");
    writer.join().unwrap();

    let socket = volume.path("app.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(b"pong").unwrap();
    });
    let mut client = UnixStream::connect(&socket).unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    server.join().unwrap();
    assert_eq!(answer, "pong");
    assert!(fs::metadata(&socket).unwrap().file_type().is_socket());

    let device = volume.path("null");
    let c_device = CString::new(device.as_os_str().as_bytes()).unwrap();
    let number = libc::makedev(1, 3);
    // SAFETY: a valid C string; mknod only reads it.
    let made = unsafe { libc::mknod(c_device.as_ptr(), libc::S_IFCHR | 0o600, number) };
    assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(
        errno(File::open(&device)),
        libc::EACCES,
        "the mount is nodev"
    );

    volume.remount_cold(&[]);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(fs::metadata(&socket).unwrap().file_type().is_socket());
    let node = fs::metadata(&device).unwrap();
    assert!(node.file_type().is_char_device());
    assert_eq!(node.rdev(), number);
    assert_eq!(node.mode() & 0o7777, 0o600);
    let (metadata, body) = volume.direct().get(&volume.key("fifo")).unwrap();
    assert_eq!(metadata["mode"], (libc::S_IFIFO | 0o640).to_string());
    assert!(body.is_empty());
    for name in [&fifo, &socket, &device] {
        fs::remove_file(name).unwrap();
    }
    assert_eq!(fs::read_dir(&volume.mountpoint).unwrap().count(), 0);
}
