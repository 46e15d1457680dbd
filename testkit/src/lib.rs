//! Test support for cairn: real servers on loopback that tests talk to over the network.
//!
//! [`S3Server::shared`] is one moto S3 server per test process (or the S3 endpoint named by
//! `CAIRN_TEST_S3_ENDPOINT` and `CAIRN_TEST_S3_BUCKET`, with credentials from the standard AWS
//! variables). Servers are started so that they die with the test process, even on a panic.
//! A missing server program is a loud failure, never a skipped test. [`Relay`] and
//! [`faults::FaultProxy`] stand between cairn and the server to take it away or make it
//! misbehave.

pub mod faults;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// A directory that lives as long as the test process (tests share it; it is removed on a
/// clean machine by the OS's tmp cleaning, not by us, since statics are never dropped).
pub fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cairn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the test process directory");
        dir
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Starts `command` so that it is killed when this test process ends: the child asks the kernel
/// for SIGKILL when its parent thread dies, and the parent thread is one that never ends.
pub fn spawn_tied_to_process(command: Command) -> Child {
    spawn_with_death_signal(command, libc::SIGKILL)
}

/// Like [`spawn_tied_to_process`], but the child gets `signal` (SIGTERM lets it clean up).
pub fn spawn_with_death_signal(mut command: Command, signal: libc::c_int) -> Child {
    let program = command.get_program().to_string_lossy().into_owned();
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let _ = send.send(command.spawn());
        loop {
            std::thread::park();
        }
    });
    receive
        .recv()
        .expect("the keeper thread answers")
        .unwrap_or_else(|e| panic!("could not start {program}: {e}"))
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not start listening on 127.0.0.1:{port} within {within:?}");
}

/// Sends one bodiless HTTP/1.1 request and returns the status code.
pub fn http_status(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {response:.80}")))
}

/// An S3 server for tests.
#[derive(Debug)]
pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    /// Credentials for the server, as a cairn secret file (None: the standard AWS chain).
    pub secret_file: Option<PathBuf>,
    port: u16,
    child: Mutex<Option<Child>>,
}

impl S3Server {
    /// The S3 server every test of this process shares: `CAIRN_TEST_S3_ENDPOINT` and
    /// `CAIRN_TEST_S3_BUCKET` if set, else a moto server started on first use.
    pub fn shared() -> &'static S3Server {
        static SHARED: OnceLock<S3Server> = OnceLock::new();
        SHARED.get_or_init(|| {
            match (
                std::env::var("CAIRN_TEST_S3_ENDPOINT"),
                std::env::var("CAIRN_TEST_S3_BUCKET"),
            ) {
                (Ok(endpoint), Ok(bucket)) => S3Server {
                    endpoint,
                    bucket,
                    secret_file: None,
                    port: 0,
                    child: Mutex::new(None),
                },
                _ => {
                    let server = Self::start_moto(false);
                    server.create_bucket();
                    server
                }
            }
        })
    }

    /// A private moto server that checks credentials and knows none, so every request is
    /// refused as a real S3 refuses bad credentials. Stopped when dropped.
    pub fn with_strict_auth() -> S3Server {
        Self::start_moto(true)
    }

    fn start_moto(strict_auth: bool) -> S3Server {
        let port = free_port();
        let log_path = process_dir().join(format!("moto-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("create the moto log");
        let mut command = Command::new("moto_server");
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log);
        if strict_auth {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        if which("moto_server").is_none() {
            panic!(
                "moto_server is not on PATH: the README's test command (scripts/test) installs it \
                 with pip install 'moto[server]'"
            );
        }
        let child = spawn_tied_to_process(command);
        wait_for_port(port, Duration::from_secs(60), "moto_server");
        let secret_file = process_dir().join(format!("moto-{port}.secret"));
        std::fs::write(
            &secret_file,
            "aws_access_key_id = cairntest\naws_secret_access_key = cairntestsecret\n",
        )
        .expect("write the test secret file");
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "cairn-test".to_string(),
            secret_file: Some(secret_file),
            port,
            child: Mutex::new(Some(child)),
        }
    }

    fn create_bucket(&self) {
        let status = http_status(self.port, "PUT", &format!("/{}", self.bucket))
            .unwrap_or_else(|e| panic!("create bucket {} on moto: {e}", self.bucket));
        assert!(
            status == 200,
            "create bucket {}: HTTP {status}",
            self.bucket
        );
    }

    /// A store spec for a prefix of the test bucket.
    pub fn spec(&self, prefix: &str) -> String {
        self.spec_for_bucket(&self.bucket, prefix)
    }

    /// A store spec for a prefix of any bucket on this server.
    pub fn spec_for_bucket(&self, bucket: &str, prefix: &str) -> String {
        let mut spec = format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint);
        if let Some(secret) = &self.secret_file {
            spec.push_str(&format!("&secret_file={}", secret.display()));
        }
        spec
    }

    /// The loopback port of a server this process started (0 for an outside endpoint).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A prefix no other test uses.
    pub fn unique_prefix(label: &str) -> String {
        format!("{label}-{}", uuid::Uuid::new_v4().simple())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The full path of a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// A TCP relay on loopback in front of a server, that can be stopped (the port refuses
/// connections and open ones are cut) and started again on the same port: to a client it is the
/// server going away and coming back.
pub struct Relay {
    pub port: u16,
    target: u16,
    state: std::sync::Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    running: std::sync::atomic::AtomicBool,
    generation: std::sync::atomic::AtomicU64,
    /// Open connections by number (client and server sides), to cut them on `stop`; each is
    /// dropped once its client hangs up, so a long run does not run out of descriptors.
    connections: Mutex<std::collections::HashMap<u64, [TcpStream; 2]>>,
    next_connection: std::sync::atomic::AtomicU64,
    /// Bytes relayed towards the server, and back.
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

impl Relay {
    /// Starts relaying a new loopback port to `target`.
    pub fn start(target: u16) -> Relay {
        let relay = Relay {
            port: free_port(),
            target,
            state: std::sync::Arc::new(RelayState::default()),
        };
        relay.resume();
        relay
    }

    /// Listens again (after `stop`).
    pub fn resume(&self) {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the relay port");
        listener.set_nonblocking(true).unwrap();
        self.state.running.store(true, Ordering::SeqCst);
        let generation = self.state.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (state, target) = (std::sync::Arc::clone(&self.state), self.target);
        std::thread::spawn(move || {
            while state.running.load(Ordering::SeqCst)
                && state.generation.load(Ordering::SeqCst) == generation
            {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).ok();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let (Ok(client_side), Ok(server_side)) =
                            (client.try_clone(), server.try_clone())
                        else {
                            continue;
                        };
                        let id = state.next_connection.fetch_add(1, Ordering::Relaxed);
                        let mut connections = state.connections.lock().unwrap();
                        connections.insert(id, [client_side, server_side]);
                        drop(connections);
                        let (sent, received) =
                            (std::sync::Arc::clone(&state), std::sync::Arc::clone(&state));
                        let (Ok(from_client), Ok(to_server)) =
                            (client.try_clone(), server.try_clone())
                        else {
                            continue;
                        };
                        let forget = std::sync::Arc::clone(&state);
                        pipe(
                            from_client,
                            to_server,
                            move |n| sent.sent.fetch_add(n, Ordering::Relaxed),
                            move || {
                                forget.connections.lock().unwrap().remove(&id);
                            },
                        );
                        pipe(
                            server,
                            client,
                            move |n| received.received.fetch_add(n, Ordering::Relaxed),
                            || {},
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    /// Bytes relayed so far: (to the server, from the server).
    pub fn traffic(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.state.sent.load(Ordering::Relaxed),
            self.state.received.load(Ordering::Relaxed),
        )
    }

    /// Stops listening and cuts every open connection.
    pub fn stop(&self) {
        use std::sync::atomic::Ordering;
        self.state.running.store(false, Ordering::SeqCst);
        let mut connections = self
            .state
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, streams) in connections.drain() {
            for stream in streams {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        drop(connections);
        // Let the accept loop see the flag and drop the listener.
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies `from` to `to` on a thread of its own, counting bytes; `ended` runs when `from` ends.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    count: impl Fn(u64) -> u64 + Send + 'static,
    ended: impl FnOnce() + Send + 'static,
) {
    std::thread::spawn(move || {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                    count(n as u64);
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        ended();
    });
}
