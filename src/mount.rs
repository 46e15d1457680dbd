//! `cairn mount STORE-SPEC MOUNTPOINT`: mounts a store prefix in the foreground, like
//! `rclone mount`, until SIGINT or SIGTERM (then uploads what changed and unmounts) or until
//! someone unmounts it with `fusermount3 -u` or `umount`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cairn_driver::options::{parse_octal, parse_size};
use cairn_fs::attrs::Defaults;
use cairn_fs::fs::FsConfig;
use cairn_fs::lease::{self, Lease, LeaseError, LeaseOptions};
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
    /// This mount is the only writer of the store folder (as an exclusive volume's is): what it
    /// lists, looks up or makes stays known while it is mounted, without asking the store again,
    /// so namespace operations work with the store away. Objects other tools put into the folder
    /// meanwhile show up at the next mount. `--metadata-ttl` then only sets the kernel's TTL.
    #[arg(long, conflicts_with = "read_only")]
    pub only_writer: bool,
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
    /// Hold the exclusive lease of volume LEASE_NAME in this store (its root, where `.cairn/`
    /// is) while mounted: taken before mounting, renewed, released after the last upload.
    #[arg(long, requires = "lease_name")]
    pub lease_store: Option<String>,
    /// The volume whose lease to hold.
    #[arg(long, requires = "lease_store")]
    pub lease_name: Option<String>,
    /// This host's name in leases. Default: the hostname.
    #[arg(long)]
    pub host_id: Option<String>,
    /// Seconds a lease lasts without renewal; another host may take it over after that.
    #[arg(long, default_value_t = 30.0)]
    pub lease_ttl: f64,
    /// Keep every read and write going through cairn, even where the kernel could read and
    /// write a wholly cached file itself (FUSE passthrough, Linux 6.9+, as root).
    #[arg(long)]
    pub no_passthrough: bool,
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

/// In the cache directory: the token of the lease this cache's changes were made under.
const TOKEN_FILE: &str = "LEASE";
/// In the cache directory: written when the lease was lost while mounted.
const LOST_MARKER: &str = "LOST";

/// Takes the volume's lease. A cache whose changes were made under a lease that is no longer
/// this host's (lost while mounted, or taken over after a crash) is set aside first, so that
/// nothing in it overwrites the new holder's data.
async fn take_lease(
    root: &str,
    volume: &str,
    host: String,
    ttl: Duration,
    cache_dir: &Path,
) -> Result<Lease, String> {
    let root_spec: StoreSpec = root
        .parse()
        .map_err(|e: cairn_fs::store::StoreError| e.message().to_string())?;
    let store = open_store(&root_spec)
        .await
        .map_err(|e| format!("opening {root_spec}: {e}"))?;
    let options = LeaseOptions {
        store,
        key: lease::lease_key(volume),
        host,
        ttl,
    };
    let token = std::fs::read_to_string(cache_dir.join(TOKEN_FILE)).ok();
    let current = lease::read(&options.store, &options.key)
        .await
        .map_err(|e| format!("volume {volume}: {e}"))?;
    let still_ours = token
        .as_deref()
        .is_some_and(|t| current.as_ref().is_some_and(|(r, _)| r.token == t));
    if cache_dir.join(LOST_MARKER).exists() {
        set_aside(cache_dir, "its lease was taken over while it was mounted")?;
    } else if token.is_some() && !still_ours {
        set_aside(
            cache_dir,
            "another host took the volume over after this host's mount ended uncleanly",
        )?;
    }
    let token = token.filter(|_| still_ours);
    let held = Lease::acquire(options, token.as_deref())
        .await
        .map_err(|e| format!("volume {volume}: {e}"))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(cache_dir)
            .map_err(|e| format!("creating {}: {e}", cache_dir.display()))?;
    }
    std::fs::write(cache_dir.join(TOKEN_FILE), &held.record().token)
        .and_then(|()| std::fs::File::open(cache_dir.join(TOKEN_FILE))?.sync_all())
        .map_err(|e| format!("recording the lease in {}: {e}", cache_dir.display()))?;
    Ok(held)
}

/// Moves a cache directory out of the way, keeping it for the operator.
fn set_aside(cache_dir: &Path, why: &str) -> Result<(), String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = cache_dir.file_name().unwrap_or_default().to_string_lossy();
    let aside = cache_dir.with_file_name(format!("{name}.set-aside-{stamp}"));
    std::fs::rename(cache_dir, &aside)
        .map_err(|e| format!("setting the cache {} aside: {e}", cache_dir.display()))?;
    eprintln!(
        "warning: the cache's changes were not uploaded and never will be: {why}. They are kept \
         in {} for you to inspect; the volume starts from what the store holds.",
        aside.display()
    );
    Ok(())
}

/// The share of a lease's TTL, counted from when its renewal was asked, during which uploads
/// may go on: the rest is a margin for clocks and slow requests.
const UPLOAD_SHARE: f64 = 0.8;

/// Renews the lease every third of its TTL. When it is lost (taken over), or cannot be renewed
/// before it expires, the mount stops writing to the store and marks its cache.
async fn keep_lease(
    held: Arc<tokio::sync::Mutex<Option<Lease>>>,
    fs: Arc<cairn_fs::fs::Filesystem>,
    lost_marker: PathBuf,
) {
    let mut renewed = std::time::Instant::now();
    loop {
        let ttl = match held.lock().await.as_ref() {
            Some(lease) => lease.ttl(),
            None => return,
        };
        tokio::time::sleep(ttl / 3).await;
        let mut guard = held.lock().await;
        let Some(lease) = guard.as_mut() else {
            return;
        };
        let asked = std::time::Instant::now();
        let why = match lease.renew().await {
            Ok(()) => {
                renewed = asked;
                fs.allow_uploads_until(asked + ttl.mul_f64(UPLOAD_SHARE));
                continue;
            }
            Err(lost @ LeaseError::Lost(_)) => lost.to_string(),
            Err(err) if renewed.elapsed() >= ttl => {
                format!("the lease could not be renewed before it expired ({err})")
            }
            Err(err) => {
                tracing::warn!("renewing the lease: {err} (retrying)");
                continue;
            }
        };
        let _ = std::fs::write(&lost_marker, &why);
        fs.fence(why);
        *guard = None;
        return;
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
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| default_cache_dir(state_dir, &args.mountpoint));
    let lease_ttl = seconds("lease-ttl", args.lease_ttl)?;
    let lease = match (&args.lease_store, &args.lease_name) {
        (Some(root), Some(volume)) => {
            let ttl = lease_ttl;
            let host = args.host_id.clone().unwrap_or_else(lease::default_host_id);
            Some(take_lease(root, volume, host, ttl, &cache_dir).await?)
        }
        _ => None,
    };
    let options = MountOptions {
        fs: FsConfig {
            defaults: Defaults {
                uid: args.uid,
                gid: args.gid,
                file_mode: args.file_mode,
                dir_mode: args.dir_mode,
            },
            metadata_ttl,
            only_writer: args.only_writer,
            read_only: args.read_only,
            writeback_delay,
            fsync_local: args.fsync == FsyncMode::Local,
            max_dirty_age,
            passthrough: !args.no_passthrough,
            cache_size: args.cache_size,
            ..FsConfig::default()
        },
        cache_dir: cache_dir.clone(),
        source: format!("cairn:{spec}"),
        // The one writer's fsyncs send what changed to the volume's fsync log.
        fsync_log: lease
            .as_ref()
            .zip(args.lease_name.clone())
            .map(|(held, volume)| (Arc::clone(held.store()), volume)),
    };
    // Handlers before the mount goes live: a SIGTERM from then on must drain, never kill.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mounted = mount(
        store,
        &args.mountpoint,
        options,
        tokio::runtime::Handle::current(),
    )
    .await
    .map_err(|e| e.to_string())?;
    eprintln!("mounted {spec} on {}", args.mountpoint.display());
    let lease = lease.map(|held| Arc::new(tokio::sync::Mutex::new(Some(held))));
    let renewal = lease.as_ref().map(|held| {
        let fs = Arc::clone(mounted.filesystem());
        fs.allow_uploads_until(std::time::Instant::now() + lease_ttl.mul_f64(UPLOAD_SHARE));
        tokio::spawn(keep_lease(
            Arc::clone(held),
            fs,
            cache_dir.join(LOST_MARKER),
        ))
    });

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
    let unmounted = mounted.unmount().await.map_err(|e| e.to_string());
    if let (Some(renewal), Some(lease)) = (renewal, lease) {
        renewal.abort();
        let held = lease.lock().await.take();
        // Give the lease up only once the store has everything; else it expires, and whoever
        // takes it next makes this host set its cache aside.
        if let (Some(held), Ok(())) = (held, &unmounted) {
            held.release()
                .await
                .map_err(|e| format!("releasing the lease: {e}"))?;
            let _ = std::fs::remove_file(cache_dir.join(TOKEN_FILE));
        }
    }
    unmounted?;
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
