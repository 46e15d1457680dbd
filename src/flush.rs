//! `cairn flush MOUNTPOINT|VOLUME`: asks the mount process on MOUNTPOINT (or on the daemon's
//! mountpoint of VOLUME) to upload everything now and waits until the store holds it, with a
//! progress bar on a terminal and plain lines otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_fs::control::FlushUpdate;
use cairn_fs::control::client::{self, FlushError};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, clap::Args)]
pub struct FlushArgs {
    /// Where a `cairn mount` is mounted, or the name of a volume of the daemon.
    pub mountpoint: PathBuf,
    /// The daemon's plugin socket (to find a volume's mountpoint).
    #[arg(long, env = "CAIRN_SOCKET", default_value = cairn_driver::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Give up (exit 1) after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

pub fn run(mut args: FlushArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if !args.mountpoint.is_dir() {
        // Not a directory: a volume name, mounted where the daemon says.
        let name = args.mountpoint.to_string_lossy().into_owned();
        let asked = runtime.block_on(cairn_driver::client::call(
            &args.socket,
            "/VolumeDriver.Path",
            &serde_json::json!({ "Name": name }),
        ));
        match asked {
            Ok(answer) => {
                args.mountpoint = PathBuf::from(answer["Mountpoint"].as_str().unwrap_or_default());
            }
            Err(message) => {
                eprintln!("error: {name} is neither a mountpoint nor a volume: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    match runtime.block_on(flush(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What the bar shows: changes and bytes still to go, against the most seen.
struct Progress {
    bar: Option<ProgressBar>,
    most_bytes: u64,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} uploaded, {msg}")
                    .expect("a valid template"),
            );
            bar
        });
        Self { bar, most_bytes: 0 }
    }

    fn pending(&mut self, changes: u64, bytes: u64) {
        self.most_bytes = self.most_bytes.max(bytes);
        match &self.bar {
            Some(bar) => {
                bar.set_length(self.most_bytes);
                bar.set_position(self.most_bytes - bytes);
                bar.set_message(format!("{changes} changes to go"));
            }
            None => println!("pending: {changes} changes, {bytes} bytes"),
        }
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn flush(args: &FlushArgs) -> Result<(), String> {
    let mut progress = Progress::new();
    let mut pending = (0, 0);
    let flushed = client::flush(&args.mountpoint, |update| match update {
        FlushUpdate::Pending { changes, bytes } => {
            pending = (*changes, *bytes);
            progress.pending(*changes, *bytes);
        }
        FlushUpdate::Error {
            permanent: false,
            message,
        } => progress.say(&format!("warning: {message} (retrying)")),
        FlushUpdate::Error { .. } | FlushUpdate::Done => {}
    });
    let flushed = match args.timeout {
        Some(seconds) => {
            let limit = Duration::from_secs_f64(seconds.max(0.0));
            tokio::time::timeout(limit, flushed).await.ok()
        }
        None => Some(flushed.await),
    };
    progress.finish();
    match flushed {
        Some(Ok(())) => {
            println!(
                "flushed: the store holds everything written to {}",
                args.mountpoint.display()
            );
            Ok(())
        }
        Some(Err(err @ FlushError::Unreachable { .. })) => {
            Err(format!("{err}: is it mounted with `cairn mount`?"))
        }
        Some(Err(FlushError::Failed(message))) => Err(format!(
            "{message}\nthe changes stay in the local cache; fix the cause and run cairn flush again"
        )),
        Some(Err(err)) => Err(err.to_string()),
        None => Err(format!(
            "timed out with {} changes ({} bytes) not yet in the store",
            pending.0, pending.1
        )),
    }
}
