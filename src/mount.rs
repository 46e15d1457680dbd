//! `cairn mount STORE-SPEC MOUNTPOINT`: mounts a store prefix in the foreground, like
//! `rclone mount`, until SIGINT or SIGTERM (then uploads what changed and unmounts) or until
//! someone unmounts it with `fusermount3 -u` or `umount`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use cairn_driver::options::{parse_octal, parse_size};
use cairn_fs::attrs::Defaults;
use cairn_fs::fs::FsConfig;
use cairn_fs::mount::{MountOptions, mount};
use cairn_fs::store::{StoreSpec, open_store};
use tokio::signal::unix::{SignalKind, signal};

/// The options of `cairn mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The store to mount (see `cairn store check --help` for the forms).
    pub spec: String,
    /// An existing, empty directory.
    pub mountpoint: PathBuf,
    /// Where cached file contents and their index live. Default: a folder under
    /// STATE_DIR/cache named after the mountpoint.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Seconds that what the store said is trusted before asking again; changes made by other
    /// hosts show up after at most this long.
    #[arg(long, default_value_t = 2.0)]
    pub metadata_ttl: f64,
    /// Mount read-only: every write fails with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Owner shown for objects that carry no attributes.
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    /// Group shown for objects that carry no attributes.
    #[arg(long, default_value_t = 0)]
    pub gid: u32,
    /// Permission bits (octal) shown for files that carry no attributes.
    #[arg(long, default_value = "644", value_parser = parse_octal)]
    pub file_mode: u32,
    /// Permission bits (octal) shown for directories that carry no attributes.
    #[arg(long, default_value = "755", value_parser = parse_octal)]
    pub dir_mode: u32,
    /// Seconds after a close before the file's upload starts (more writes may follow).
    #[arg(long, default_value_t = 2.0)]
    pub writeback_delay: f64,
    /// When fsync returns: once the data is in the store, or once it is on local disk.
    #[arg(long, value_enum, default_value_t = FsyncMode::Store)]
    pub fsync: FsyncMode,
    /// Seconds a file kept open and written may go without an upload.
    #[arg(long, default_value_t = 30.0)]
    pub max_dirty_age: f64,
    /// Local disk the cache may use, like 10G or 512M: clean data beyond it is evicted, and
    /// writers wait for uploads when changed data fills it.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,
}

/// When fsync returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncMode {
    Store,
    Local,
}

fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    if value.is_finite() && value >= 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!("--{name} must be a number of seconds, 0 or more"))
    }
}

/// The default cache folder of a mountpoint: its path with `/` turned into `_`.
fn default_cache_dir(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    state_dir.join("cache").join(format!("mount_{name}"))
}

pub async fn run(args: MountArgs, state_dir: &Path) -> ExitCode {
    match serve(args, state_dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: MountArgs, state_dir: &Path) -> Result<(), String> {
    let metadata_ttl = seconds("metadata-ttl", args.metadata_ttl)?;
    let writeback_delay = seconds("writeback-delay", args.writeback_delay)?;
    let max_dirty_age = seconds("max-dirty-age", args.max_dirty_age)?;
    let spec: StoreSpec = args
        .spec
        .parse()
        .map_err(|e: cairn_fs::store::StoreError| e.message().to_string())?;
    if !args.mountpoint.is_dir() {
        return Err(format!(
            "the mountpoint {} is not a directory: create it first",
            args.mountpoint.display()
        ));
    }
    let store = open_store(&spec)
        .await
        .map_err(|e| format!("opening {spec}: {e}"))?;
    let options = MountOptions {
        fs: FsConfig {
            defaults: Defaults {
                uid: args.uid,
                gid: args.gid,
                file_mode: args.file_mode,
                dir_mode: args.dir_mode,
            },
            metadata_ttl,
            read_only: args.read_only,
            writeback_delay,
            fsync_local: args.fsync == FsyncMode::Local,
            max_dirty_age,
            cache_size: args.cache_size,
            ..FsConfig::default()
        },
        cache_dir: args
            .cache_dir
            .clone()
            .unwrap_or_else(|| default_cache_dir(state_dir, &args.mountpoint)),
        source: format!("cairn:{spec}"),
    };
    let mounted = mount(
        store,
        &args.mountpoint,
        options,
        tokio::runtime::Handle::current(),
    )
    .map_err(|e| e.to_string())?;
    eprintln!("mounted {spec} on {}", args.mountpoint.display());

    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = ticker.tick() => if !mounted.is_mounted() { break },
        }
    }
    eprintln!(
        "unmounting {}; then uploading what is not yet in the store",
        args.mountpoint.display()
    );
    mounted.unmount().await.map_err(|e| e.to_string())?;
    eprintln!("unmounted {}", args.mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dirs_follow_the_mountpoint() {
        let dir = default_cache_dir(Path::new("/var/lib/cairn"), Path::new("/mnt/data/"));
        assert_eq!(dir, Path::new("/var/lib/cairn/cache/mount_mnt_data"));
    }
}
