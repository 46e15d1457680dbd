//! The supervisor of per-volume mount processes: starts `cairn mount` for a volume in its own
//! process group (so that stopping or restarting the daemon leaves it running), waits until its
//! FUSE mount is live, asks it to unmount and drain with SIGTERM, and tells a live process from a
//! dead one (or from an unrelated process that got its PID) by its start time.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::process::Command;
use tokio::time::{Instant, sleep};

/// How long a mount process may take to mount.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running mount process, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountProcess {
    pub pid: u32,
    /// The process's start time (clock ticks after boot, from /proc), which tells it from a later
    /// process that reuses the PID.
    pub started: u64,
    pub mountpoint: PathBuf,
}

/// How to start one volume's mount process.
#[derive(Debug, Clone)]
pub struct MountCommand {
    /// The `cairn` binary.
    pub program: PathBuf,
    pub state_dir: PathBuf,
    pub spec: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    /// The process's stdout and stderr go here (appended).
    pub log: PathBuf,
    pub flags: Vec<String>,
}

/// The state letter and start time of a process, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the file is the start time; `fields` begins at field 3.
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

impl MountProcess {
    /// Whether this very process still runs (a zombie does not count).
    pub fn is_alive(&self) -> bool {
        proc_stat(self.pid)
            .is_some_and(|(state, started)| started == self.started && !matches!(state, 'Z' | 'X'))
    }

    /// Whether the process runs and its FUSE mount is there.
    pub fn is_serving(&self) -> bool {
        self.is_alive() && is_fuse_mounted(&self.mountpoint)
    }
}

/// Decodes the octal escapes (`\040` for a space) of a /proc/self/mountinfo path.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a FUSE filesystem is mounted on `mountpoint` (live or dead: a mount whose process
/// died stays listed until someone unmounts it).
pub fn is_fuse_mounted(mountpoint: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = mountpoint.to_string_lossy();
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|tail| tail.split(' ').next());
        fields.get(4).map(|p| unescape_mount_path(p)).as_deref() == Some(&wanted)
            && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

/// Unmounts what is left on `mountpoint` by a mount process that died (lazily, so that a
/// container still holding it does not block the cleanup).
pub async fn clean_dead_mount(mountpoint: &Path) {
    if !is_fuse_mounted(mountpoint) {
        return;
    }
    tracing::warn!(mountpoint = %mountpoint.display(), "unmounting the dead mount of a crashed mount process");
    let unmounted = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mountpoint)
            .status()
            .await;
    }
}

/// What the log file holds from `offset` on (the last 2,000 bytes of it).
fn log_since(log: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        let _ = file.seek(SeekFrom::Start(offset));
        let _ = file.read_to_string(&mut text);
    }
    let text = text.trim();
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    text[start..].to_string()
}

/// Starts a mount process and waits until its mount is live. On failure the error holds what the
/// process said.
pub async fn start(command: &MountCommand) -> Result<MountProcess, String> {
    for dir in [&command.mountpoint, &command.cache_dir] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&command.log)
        .map_err(|e| format!("cannot open the log {}: {e}", command.log.display()))?;
    let offset = log.metadata().map_or(0, |m| m.len());
    let stderr = log
        .try_clone()
        .map_err(|e| format!("cannot open the log {}: {e}", command.log.display()))?;
    let mut child = Command::new(&command.program)
        .arg("--state-dir")
        .arg(&command.state_dir)
        .arg("mount")
        .arg(&command.spec)
        .arg(&command.mountpoint)
        .arg("--cache-dir")
        .arg(&command.cache_dir)
        .args(&command.flags)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", command.program.display()))?;
    let pid = child.id().ok_or("the mount process ended at once")?;
    let started = proc_stat(pid).map_or(0, |(_, started)| started);
    let process = MountProcess {
        pid,
        started,
        mountpoint: command.mountpoint.clone(),
    };
    // Reap the child whenever it ends; the daemon need not be around for that.
    let (exited_tx, mut exited) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = exited_tx.send(child.wait().await);
    });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(status) = exited.try_recv() {
            let said = log_since(&command.log, offset);
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            return Err(format!("the mount process ended ({status}): {said}"));
        }
        if is_fuse_mounted(&command.mountpoint) {
            return Ok(process);
        }
        if Instant::now() > deadline {
            stop(&process, Duration::from_secs(5)).await;
            return Err(format!(
                "the mount process did not mount within {}s: {}",
                START_TIMEOUT.as_secs(),
                log_since(&command.log, offset)
            ));
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Asks a mount process to unmount, upload what is pending and exit (SIGTERM), and waits up to
/// `timeout`. Returns whether it has exited; if not, it goes on draining in the background.
pub async fn stop(process: &MountProcess, timeout: Duration) -> bool {
    if !process.is_alive() {
        return true;
    }
    let Some(pid) = i32::try_from(process.pid).ok().and_then(Pid::from_raw) else {
        return true;
    };
    if let Err(err) = kill_process(pid, Signal::TERM) {
        tracing::warn!(pid = process.pid, "cannot signal the mount process: {err}");
    }
    let deadline = Instant::now() + timeout;
    while process.is_alive() {
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(50)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/tab\011x\"), "/tab\tx\\");
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let pid = std::process::id();
        let (_, started) = proc_stat(pid).unwrap();
        let me = MountProcess {
            pid,
            started,
            mountpoint: "/".into(),
        };
        assert!(me.is_alive());
        let impostor = MountProcess {
            started: started + 1,
            ..me
        };
        assert!(!impostor.is_alive());
    }
}
