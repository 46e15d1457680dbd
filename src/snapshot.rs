//! `cairn snapshot create|ls|restore`: point-in-time copies of a volume, kept in its store
//! (server-side copies), and new volumes made from them. Works on the config's stores directly;
//! a volume mounted on this host uploads what it holds first.

use std::path::{Path, PathBuf};

use cairn_driver::config::Config;
use cairn_driver::volumes::Driver;

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
    /// The config file (as for `cairn serve`).
    #[arg(long, global = true, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Upload what the volume's mount here holds, then copy every object of the volume.
    Create { volume: String, name: String },
    /// The volume's snapshots, oldest first.
    Ls { volume: String },
    /// Make a new volume from a snapshot (same store and options).
    Restore {
        volume: String,
        name: String,
        new_volume: String,
    },
}

/// Runs the subcommand; what to print, or why it failed.
pub async fn run(args: SnapshotArgs, state_dir: &Path) -> Result<String, String> {
    let config = Config::load_named_or_default(args.config.as_deref())?;
    let program = std::env::current_exe().map_err(|e| e.to_string())?;
    let driver = Driver::open(&config, state_dir, program)
        .await
        .map_err(|e| e.to_string())?;
    Ok(match args.command {
        SnapshotCommand::Create { volume, name } => {
            let taken = driver
                .snapshot_create(&volume, &name)
                .await
                .map_err(|e| e.to_string())?;
            format!(
                "snapshot {} of {}: {} objects, {} bytes, at {}\n",
                taken.name, taken.volume, taken.objects, taken.bytes, taken.created_at
            )
        }
        SnapshotCommand::Ls { volume } => {
            let snapshots = driver
                .snapshot_list(&volume)
                .await
                .map_err(|e| e.to_string())?;
            let mut text = String::from("NAME  CREATED  OBJECTS  BYTES\n");
            for s in snapshots {
                text.push_str(&format!(
                    "{}  {}  {}  {}\n",
                    s.name, s.created_at, s.objects, s.bytes
                ));
            }
            text
        }
        SnapshotCommand::Restore {
            volume,
            name,
            new_volume,
        } => {
            let (objects, bytes) = driver
                .snapshot_restore(&volume, &name, &new_volume)
                .await
                .map_err(|e| e.to_string())?;
            format!(
                "restored snapshot {name} of {volume} into volume {new_volume}: {objects} \
                 objects, {bytes} bytes (use it: docker run -v {new_volume}:/data \
                 --volume-driver cairn ...)\n"
            )
        }
    })
}
