//! `cairn serve`: the plugin daemon Docker talks to. Reads the config, opens the stores, re-adopts
//! the mount processes a previous daemon left, and answers the VolumeDriver protocol on the plugin
//! socket until SIGTERM or SIGINT. Stopping it leaves live mounts running.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cairn_driver::config::Config;
use cairn_driver::volumes::Driver;
use cairn_driver::{metrics, server};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The config file (TOML). A missing /etc/cairn/config.toml means the defaults: the embedded
    /// dir store under the state directory.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// The plugin socket, instead of the config's (its file name is the driver's name in Docker).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where volumes are mounted, instead of the config's `mounts_dir` (the managed plugin sets
    /// its propagated mount here).
    #[arg(long, env = "CAIRN_MOUNTS_DIR")]
    pub mounts_dir: Option<PathBuf>,
}

pub async fn run(args: ServeArgs, state_dir: &Path) -> ExitCode {
    match serve(args, state_dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs, state_dir: &Path) -> Result<(), String> {
    let mut config = Config::load_named_or_default(args.config.as_deref())?;
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    if let Some(mounts_dir) = args.mounts_dir {
        config.mounts_dir = Some(mounts_dir);
    }
    let program = std::env::current_exe()
        .map_err(|e| format!("cannot find the cairn binary for mount processes: {e}"))?;
    let driver = Driver::open(&config, state_dir, program)
        .await
        .map_err(|e| e.to_string())?;
    driver.adopt().await.map_err(|e| e.to_string())?;
    let driver = Arc::new(driver);
    let metrics = match config.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot serve metrics on {address}: {e}"))?;
            eprintln!("cairn serves metrics on http://{address}/metrics");
            Some(tokio::spawn(metrics::serve(Arc::clone(&driver), listener)))
        }
        None => None,
    };
    // Handlers first: a SIGTERM that arrives once the socket answers must stop cairn cleanly.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let listener = server::bind(&config.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", config.socket.display()))?;
    eprintln!(
        "cairn serves Docker on {} (state in {})",
        config.socket.display(),
        state_dir.display()
    );
    let stopped = async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    };
    server::serve(driver, listener, stopped).await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    eprintln!("cairn stopped serving; running mounts go on");
    Ok(())
}
