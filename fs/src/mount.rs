//! Wires a mount: the store, the cache directory, the filesystem logic and a FUSE session on a
//! mountpoint, mounted with allow_other and default_permissions so that containers running as
//! any user can use it and the kernel checks mode bits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::cache::Cache;
use crate::error::FsError;
use crate::fs::{Filesystem, FsConfig};
use crate::fuse::FuseAdapter;
use crate::store::SharedStore;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot use the cache directory {path}: {source}")]
    Cache { path: PathBuf, source: FsError },
    #[error(
        "cannot mount on {path}: {source} (is it an existing, empty directory, is /dev/fuse there, and are you root?)"
    )]
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uploading changes before unmounting: {0}")]
    Flush(FsError),
    #[error(
        "bringing the store up to date from the fsync log of the last mount: {0} (the store must answer before the volume is served; nothing was changed locally)"
    )]
    FsyncLog(FsError),
    #[error("cannot listen on the control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub fs: FsConfig,
    pub cache_dir: PathBuf,
    /// What `mount` shows as the source (never a secret).
    pub source: String,
    /// For the volume's one writer (it holds the lease): the store root and the volume name
    /// of its fsync log (see [`crate::fsync_log`]), folded into the store before the mount
    /// serves anything.
    pub fsync_log: Option<(SharedStore, String)>,
}

/// A live mount.
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    fs: Arc<Filesystem>,
    mountpoint: PathBuf,
    /// The uploader and the control socket.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Mounts `store` on `mountpoint`; requests are served on `runtime` (the caller's).
pub async fn mount(
    store: SharedStore,
    mountpoint: &Path,
    options: MountOptions,
    runtime: tokio::runtime::Handle,
) -> Result<Mounted, MountError> {
    let cache = Cache::open(&options.cache_dir).map_err(|source| MountError::Cache {
        path: options.cache_dir.clone(),
        source,
    })?;
    let read_only = options.fs.read_only;
    let fs = Filesystem::new(store, cache, options.fs).map_err(|source| MountError::Cache {
        path: options.cache_dir.clone(),
        source,
    })?;
    let fs = match options.fsync_log {
        Some((root, volume)) => fs.with_fsync_log(root, &volume),
        None => fs,
    };
    let fs = Arc::new(fs);
    fs.fold_fsync_log().await.map_err(MountError::FsyncLog)?;
    let uploader = fs.start_uploader();
    if fs.config().only_writer {
        // The only writer knows its root from the start (see `Filesystem::know_the_root`).
        let fs = Arc::clone(&fs);
        tokio::spawn(async move {
            if let Err(err) = fs.know_the_root().await {
                tracing::warn!(
                    "listing the root: {err}; a new name there asks the store until it answers"
                );
            }
        });
    }
    let control = crate::control::serve(Arc::clone(&fs), mountpoint).map_err(|source| {
        MountError::Control {
            path: crate::control::socket_path(mountpoint),
            source,
        }
    })?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.source),
        MountOption::Subtype("cairn".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(2);
    let adapter = FuseAdapter::new(Arc::clone(&fs), runtime);
    let session =
        fuser::spawn_mount(adapter, mountpoint, &config).map_err(|source| MountError::Fuse {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    Ok(Mounted {
        session: Some(session),
        fs,
        mountpoint: mountpoint.to_path_buf(),
        tasks: vec![uploader, control],
    })
}

impl Mounted {
    pub fn filesystem(&self) -> &Arc<Filesystem> {
        &self.fs
    }

    /// Whether the kernel still has the mount (false once someone ran `fusermount3 -u`).
    pub fn is_mounted(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts (if still mounted), then waits until the store holds every change.
    pub async fn unmount(mut self) -> Result<(), MountError> {
        let mut unmounted = Ok(());
        if let Some(session) = self.session.take() {
            let path = self.mountpoint.clone();
            let still_mounted = !session.guard.is_finished();
            let ended = tokio::task::spawn_blocking(move || {
                if still_mounted {
                    session.umount_and_join()
                } else {
                    session.join()
                }
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()));
            if let Err(source) | Ok(Err(source)) = ended {
                unmounted = Err(MountError::Unmount { path, source });
            }
        }
        let drained = self.fs.drain(None).await.map_err(MountError::Flush);
        if drained.is_ok()
            && let Err(err) = self.fs.clear_fsync_log().await
        {
            // Every change is in the store: what is left of the log is moot, and the next
            // mount deletes it.
            tracing::warn!("deleting the fsync log after the last upload: {err}");
        }
        for task in &self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(crate::control::socket_path(&self.mountpoint));
        unmounted.and(drained)
    }
}
