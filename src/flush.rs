//! `cairn flush MOUNTPOINT|VOLUME`: asks the mount process on MOUNTPOINT (or on the daemon's
//! mountpoint of VOLUME) to upload everything now and waits until the store holds it, with a
//! progress bar on a terminal and plain lines otherwise.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cairn_fs::control::socket_path;
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
    match flush(&args) {
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

fn flush(args: &FlushArgs) -> Result<(), String> {
    let path = socket_path(&args.mountpoint);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no cairn mount answers for {} ({}: {e}): is it mounted with `cairn mount`?",
            args.mountpoint.display(),
            path.display()
        )
    })?;
    stream.write_all(b"flush\n").map_err(|e| e.to_string())?;
    let deadline = args
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    if let Some(deadline) = deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
    }
    let mut progress = Progress::new();
    let mut pending = (0, 0);
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "timed out with {} changes ({} bytes) not yet in the store",
                pending.0, pending.1
            ),
            _ => format!("lost the mount process: {e}"),
        })?;
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("pending"), Some(changes), Some(bytes)) => {
                pending = (changes.parse().unwrap_or(0), bytes.parse().unwrap_or(0));
                progress.pending(pending.0, pending.1);
            }
            (Some("error"), Some("permanent"), Some(message)) => {
                progress.finish();
                return Err(format!(
                    "{message}\nthe changes stay in the local cache; fix the cause and run cairn flush again"
                ));
            }
            (Some("error"), Some(_), Some(message)) => {
                progress.say(&format!("warning: {message} (retrying)"))
            }
            (Some("done"), _, _) => {
                progress.finish();
                println!(
                    "flushed: the store holds everything written to {}",
                    args.mountpoint.display()
                );
                return Ok(());
            }
            _ => {}
        }
    }
    progress.finish();
    Err("the mount process closed the connection before the flush finished".into())
}
