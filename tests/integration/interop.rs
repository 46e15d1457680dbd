//! cairn and its peers on the same S3 server: s3fs and rclone (Debian's packages) read the files,
//! modes, owners and times that cairn writes, and cairn reads theirs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::common::{Volume, is_mounted, require_fuse};
use cairn_testkit::S3Server;

const CAIRN_TEST_KEY: &str = "cairntest";
const CAIRN_TEST_SECRET: &str = "cairntestsecret";

fn require(program: &str) {
    assert!(
        cairn_testkit::which(program).is_some(),
        "{program} is not installed: the README's test command installs it (apt-get install {program})"
    );
}

/// An s3fs mount of a prefix of the test bucket, unmounted on drop.
struct S3fs {
    mountpoint: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl S3fs {
    fn mount(prefix: &str) -> S3fs {
        require_fuse();
        require("s3fs");
        let server = S3Server::shared();
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("passwd");
        fs::write(&password, format!("{CAIRN_TEST_KEY}:{CAIRN_TEST_SECRET}\n")).unwrap();
        fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).unwrap();
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).unwrap();
        let child = Command::new("s3fs")
            .arg(format!("{}:/{prefix}", server.bucket))
            .arg(&mountpoint)
            .args([
                "-f",
                "-o",
                &format!("url={}", server.endpoint),
                "-o",
                "use_path_request_style",
            ])
            .args(["-o", "endpoint=us-east-1", "-o", "allow_other"])
            .arg("-o")
            .arg(format!("passwd_file={}", password.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&mountpoint) {
            assert!(Instant::now() < deadline, "s3fs did not mount within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3fs {
            mountpoint,
            child: Some(child),
            _dir: dir,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }

    fn unmount(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mountpoint)
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        self.unmount();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Runs rclone with a remote `m:` that points at the test S3 server.
fn rclone(args: &[&str]) -> String {
    require("rclone");
    let server = S3Server::shared();
    let output = Command::new("rclone")
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG", "/dev/null")
        .env("RCLONE_CONFIG_M_TYPE", "s3")
        .env("RCLONE_CONFIG_M_PROVIDER", "Other")
        .env("RCLONE_CONFIG_M_ENDPOINT", &server.endpoint)
        .env("RCLONE_CONFIG_M_ACCESS_KEY_ID", CAIRN_TEST_KEY)
        .env("RCLONE_CONFIG_M_SECRET_ACCESS_KEY", CAIRN_TEST_SECRET)
        .output()
        .expect("run rclone");
    assert!(
        output.status.success(),
        "rclone {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn spec_of(prefix: &str) -> String {
    S3Server::shared().spec(prefix)
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode()
}

/// Sets a path's atime and mtime the way `touch -d` does: utimensat with both times, without
/// opening the file for writing (s3fs 1.90 stamps the time anew on a write-open, and ignores a
/// new mtime that comes with UTIME_OMIT for the atime).
fn set_mtime(path: &Path, seconds: i64) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: seconds,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: seconds,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Writes a file, a directory and a symlink with distinctive attributes under `root`.
fn write_sample(root: &Path) {
    let file = root.join("data.txt");
    fs::write(&file, b"shared between tools\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&file, Some(1234), Some(5678)).unwrap();
    set_mtime(&file, 1_700_000_000);
    fs::create_dir(root.join("dir")).unwrap();
    fs::set_permissions(root.join("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(root.join("dir/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("data.txt", root.join("link")).unwrap();
}

/// Checks what `write_sample` wrote, as seen under `root`.
fn check_sample(root: &Path, who: &str) {
    let file = root.join("data.txt");
    assert_eq!(
        fs::read(&file).unwrap(),
        b"shared between tools\n",
        "{who}: contents"
    );
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.mode(), 0o100640, "{who}: file mode");
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{who}: owner");
    assert_eq!(meta.mtime(), 1_700_000_000, "{who}: mtime");
    assert_eq!(mode(&root.join("dir")), 0o040750, "{who}: directory mode");
    assert_eq!(
        fs::read(root.join("dir/inner")).unwrap(),
        b"inner",
        "{who}: nested file"
    );
    assert_eq!(
        fs::read_link(root.join("link")).unwrap(),
        Path::new("data.txt"),
        "{who}: symlink"
    );
    assert_eq!(
        mode(&root.join("link")) & 0o170000,
        0o120000,
        "{who}: symlink type"
    );
}

#[test]
fn s3fs_reads_what_cairn_writes() {
    let prefix = S3Server::unique_prefix("interop");
    let mut cairn = Volume::mount(&spec_of(&prefix), &[]);
    write_sample(&cairn.mountpoint);
    cairn.stop();
    let s3fs = S3fs::mount(&prefix);
    check_sample(&s3fs.mountpoint, "s3fs reading cairn");
}

#[test]
fn cairn_reads_what_s3fs_writes() {
    let prefix = S3Server::unique_prefix("interop");
    let mut s3fs = S3fs::mount(&prefix);
    write_sample(&s3fs.mountpoint);
    assert!(s3fs.path("data.txt").exists());
    s3fs.unmount();
    let cairn = Volume::mount(&spec_of(&prefix), &[]);
    check_sample(&cairn.mountpoint, "cairn reading s3fs");
}

#[test]
fn rclone_reads_the_mtime_cairn_writes() {
    let prefix = S3Server::unique_prefix("interop");
    let mut cairn = Volume::mount(&spec_of(&prefix), &[]);
    write_sample(&cairn.mountpoint);
    cairn.stop();
    let bucket = &S3Server::shared().bucket;
    let listing = rclone(&["lsjson", &format!("m:{bucket}/{prefix}")]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&listing).expect("lsjson is JSON");
    let data = entries
        .iter()
        .find(|e| e["Name"] == "data.txt")
        .unwrap_or_else(|| panic!("rclone lists data.txt: {listing}"));
    assert_eq!(data["Size"], 21);
    let modified = data["ModTime"].as_str().unwrap();
    assert!(
        modified.starts_with("2023-11-14T22:13:20"),
        "rclone sees cairn's mtime: {modified}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["Name"] == "dir" && e["IsDir"] == true),
        "{listing}"
    );
    let contents = rclone(&["cat", &format!("m:{bucket}/{prefix}/data.txt")]);
    assert_eq!(contents, "shared between tools\n");
}

#[test]
fn cairn_reads_what_rclone_writes() {
    let prefix = S3Server::unique_prefix("interop");
    let local = tempfile::tempdir().unwrap();
    let source = local.path().join("from-rclone.txt");
    fs::write(&source, b"copied by rclone").unwrap();
    let when = UNIX_EPOCH + Duration::new(1_700_000_123, 500_000_000);
    fs::File::options()
        .write(true)
        .open(&source)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let bucket = &S3Server::shared().bucket;
    rclone(&[
        "copyto",
        source.to_str().unwrap(),
        &format!("m:{bucket}/{prefix}/sub/from-rclone.txt"),
    ]);

    let cairn = Volume::mount(
        &spec_of(&prefix),
        &["--file-mode", "604", "--dir-mode", "705"],
    );
    let path = cairn.path("sub/from-rclone.txt");
    assert_eq!(fs::read(&path).unwrap(), b"copied by rclone");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(
        meta.modified().unwrap(),
        when,
        "rclone's fractional mtime, to the nanosecond"
    );
    assert_eq!(
        meta.mode(),
        0o100604,
        "no mode from rclone: the mount's default file mode"
    );
    assert_eq!(
        mode(&cairn.path("sub")),
        0o040705,
        "a prefix without a marker: the default dir mode"
    );
}

/// Makes a FIFO at `path` with mode 0640.
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mkfifo only reads it.
    let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o640) };
    assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// A FIFO made on one reads back as a FIFO with its mode on the other, both ways: cairn keeps
/// special files as s3fs does.
#[test]
fn fifos_cross_between_cairn_and_s3fs() {
    let prefix = S3Server::unique_prefix("interop");
    let mut cairn = Volume::mount(&spec_of(&prefix), &[]);
    mkfifo(&cairn.path("from-cairn"));
    cairn.stop();
    let mut s3fs = S3fs::mount(&prefix);
    assert!(
        is_fifo(&s3fs.path("from-cairn")),
        "s3fs reading cairn's FIFO"
    );
    assert_eq!(mode(&s3fs.path("from-cairn")) & 0o7777, 0o640);
    mkfifo(&s3fs.path("from-s3fs"));
    s3fs.unmount();
    let cairn = Volume::mount(&spec_of(&prefix), &[]);
    assert!(
        is_fifo(&cairn.path("from-s3fs")),
        "cairn reading s3fs's FIFO"
    );
    assert_eq!(mode(&cairn.path("from-s3fs")) & 0o7777, 0o640);
}
