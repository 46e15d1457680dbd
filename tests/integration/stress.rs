//! Many writers on one volume for a while, with the store going away twice and the mount
//! process killed once: afterwards the store holds exactly what a model of the work says, and the
//! mount process's memory stayed bounded.
//!
//! It runs for `CAIRN_STRESS_SECONDS` (default 60); `scripts/soak` runs it for 30 minutes and
//! more. When a writer fails, the mount's whole log goes to the file `CAIRN_STRESS_KEEP_LOG`
//! names, if set. The store goes away by a relay in front of the S3 server closing (moto keeps
//! its objects in memory, so a real restart would lose them).

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Direct, Volume};
use cairn_testkit::{Relay, S3Server};

const WRITERS: usize = 8;
/// Names each writer works on.
const FILES: u64 = 40;

/// A small xorshift generator: the workload is the same for the same seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let seed = self.next();
        (0..len)
            .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ (i as u8))
            .collect()
    }
}

/// What the test and the writers share.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
    paused: AtomicUsize,
    operations: AtomicU64,
    bytes_written: AtomicU64,
    /// Operations refused with EIO while the store was away, and retried.
    refused: AtomicU64,
    store_away: AtomicBool,
    store_back_at: Mutex<Option<Instant>>,
}

impl Control {
    /// Blocks a writer while the test holds the mount still; true once it is time to stop.
    fn checkpoint(&self, relist: impl FnOnce()) -> bool {
        if self.pause.load(Ordering::SeqCst) {
            self.paused.fetch_add(1, Ordering::SeqCst);
            while self.pause.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.paused.fetch_sub(1, Ordering::SeqCst);
            relist();
        }
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until every writer is between operations (its files closed).
    fn hold(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) < WRITERS {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn release(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn set_store_away(&self, away: bool) {
        self.store_away.store(away, Ordering::SeqCst);
        if !away {
            *self.store_back_at.lock().unwrap() = Some(Instant::now());
        }
    }

    /// Whether the store is away, or came back so recently that requests made while it was
    /// away may still be failing (the SDK's retries back off up to 10 s).
    fn store_unsettled(&self) -> bool {
        self.store_away.load(Ordering::SeqCst)
            || self
                .store_back_at
                .lock()
                .unwrap()
                .is_some_and(|at| at.elapsed() < Duration::from_secs(20))
    }

    /// Runs `operation` until it succeeds, again after an EIO while the store is unsettled: an
    /// operation that needs bytes only the store holds (a read or an append of a file evicted
    /// from the cache) fails cleanly then, changing nothing (docs/SEMANTICS.md). Any other
    /// failure, or an EIO once the store is settled, fails the test.
    fn patiently<T>(&self, what: &str, mut operation: impl FnMut() -> std::io::Result<T>) -> T {
        loop {
            match operation() {
                Ok(value) => return value,
                Err(err) if err.raw_os_error() == Some(libc::EIO) && self.store_unsettled() => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(err) => panic!("{what}: {err}"),
            }
        }
    }
}

/// A writer's last operations, for the message when a check fails.
struct History {
    started: Instant,
    recent: VecDeque<String>,
}

impl History {
    const KEPT: usize = 400;

    fn note(&mut self, what: String) {
        if self.recent.len() == Self::KEPT {
            self.recent.pop_front();
        }
        self.recent
            .push_back(format!("{:>8.3?} {what}", self.started.elapsed()));
    }

    /// The kept operations that name `target`.
    fn about(&self, target: &str) -> String {
        let named: Vec<&str> = self
            .recent
            .iter()
            .filter(|line| line.split_whitespace().any(|word| word == target))
            .map(String::as_str)
            .collect();
        named.join("\n")
    }
}

/// How a version of a file is told apart in a failure message: its length and first bytes.
fn fingerprint(bytes: &[u8]) -> String {
    let head: String = bytes.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{} B {head}", bytes.len())
}

/// Where the writers' files live in the store, asked directly (not through the mount) when a
/// check fails.
#[derive(Clone)]
struct StoreView {
    spec: String,
    prefix: String,
}

impl StoreView {
    /// What the store holds at a writer's path, and what the mount shows there.
    fn explain(&self, root: &Path, target: &str) -> String {
        let direct = Direct::new(&self.spec);
        let stored = direct
            .get(&format!("{}{target}", self.prefix))
            .map_or("nothing".to_string(), |(_, body)| fingerprint(&body));
        let shown = match fs::read(root.join(target)) {
            Ok(bytes) => fingerprint(&bytes),
            Err(err) => format!("unreadable ({err})"),
        };
        format!("the store holds {stored}; the mount shows {shown}")
    }
}

/// One writer: mixed operations on its own folder, keeping the model of what each file holds.
fn writer(
    root: PathBuf,
    id: usize,
    control: Arc<Control>,
    store: StoreView,
) -> BTreeMap<String, Vec<u8>> {
    let dir = root.join(format!("w{id}"));
    fs::create_dir_all(&dir).unwrap();
    // Listing the folder lets the mount create names in it while the store is away.
    let relist = || {
        fs::read_dir(&dir).unwrap().for_each(drop);
    };
    relist();
    let mut random = Random(0x5EED + id as u64 * 7919);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut history = History {
        started: Instant::now(),
        recent: VecDeque::new(),
    };
    let name = |n: u64| format!("w{id}/f{n}");
    while !control.checkpoint(|| {
        history.note("list".into());
        relist()
    }) {
        let target = name(random.below(FILES));
        let path = root.join(&target);
        match random.below(100) {
            0..=34 => {
                let len = if random.below(20) == 0 {
                    3 << 20
                } else {
                    random.below(256 << 10) as usize
                };
                let bytes = random.bytes(len);
                fs::write(&path, &bytes).unwrap();
                history.note(format!("write {target} {}", fingerprint(&bytes)));
                control
                    .bytes_written
                    .fetch_add(len as u64, Ordering::Relaxed);
                model.insert(target, bytes);
            }
            35..=49 => {
                let len = random.below(64 << 10) as usize;
                let extra = random.bytes(len);
                let sync = random.below(4) == 0;
                control.patiently(&format!("appending to {target}"), || {
                    let mut file = fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&path)?;
                    file.write_all(&extra)?;
                    if sync {
                        file.sync_all()?;
                    }
                    Ok(())
                });
                let whole = model.entry(target.clone()).or_default();
                whole.extend_from_slice(&extra);
                history.note(format!("append {target} now {}", fingerprint(whole)));
            }
            50..=59 => {
                if let Some(bytes) = model.remove(&target) {
                    let to = name(random.below(FILES));
                    fs::rename(&path, root.join(&to)).unwrap();
                    history.note(format!("rename {target} -> {to} {}", fingerprint(&bytes)));
                    model.insert(to, bytes);
                }
            }
            60..=69 => {
                if model.remove(&target).is_some() {
                    fs::remove_file(&path).unwrap();
                    history.note(format!("delete {target}"));
                }
            }
            _ => match model.get(&target) {
                Some(bytes) => {
                    let read = control.patiently(&format!("reading {target}"), || fs::read(&path));
                    if read != *bytes {
                        panic!(
                            "{target} reads back wrong: {} instead of {}; {}; its history:\n{}",
                            fingerprint(&read),
                            fingerprint(bytes),
                            store.explain(&root, &target),
                            history.about(&target)
                        );
                    }
                }
                None if path.exists() => panic!(
                    "{target} was removed, yet it exists; {}; its history:\n{}",
                    store.explain(&root, &target),
                    history.about(&target)
                ),
                None => {}
            },
        }
        control.operations.fetch_add(1, Ordering::Relaxed);
    }
    model
}

/// The resident memory of a process, in KiB.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn eight_writers_through_outages_and_a_crash() {
    let seconds: u64 = std::env::var("CAIRN_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run_for = Duration::from_secs(seconds);
    let server = S3Server::shared();
    let relay = Relay::start(server.port());
    let spec = server.spec(&S3Server::unique_prefix("stress")).replace(
        &server.endpoint,
        &format!("http://127.0.0.1:{}", relay.port),
    );
    let options = ["--writeback-delay", "1", "--cache-size", "256M"];
    let volume = Arc::new(Mutex::new(Volume::mount(&spec, &options)));
    let root = volume.lock().unwrap().mountpoint.clone();
    let control = Arc::new(Control::default());
    let store = StoreView {
        spec: server.spec(""),
        prefix: volume.lock().unwrap().key(""),
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let (root, control, store) = (root.clone(), Arc::clone(&control), store.clone());
            std::thread::spawn(move || writer(root, id, control, store))
        })
        .collect();

    // The disturbances, at fixed points of the run; memory sampled every second.
    let started = Instant::now();
    let at = |fraction: f64| run_for.mul_f64(fraction);
    let mut events = vec![
        (at(0.2), "store away"),
        (at(0.2) + Duration::from_secs(5), "store back"),
        (at(0.5), "kill the mount"),
        (at(0.7), "store away"),
        (at(0.7) + Duration::from_secs(5), "store back"),
    ];
    events.reverse();
    let mut memory: Vec<(Duration, u64)> = Vec::new();
    let mut log = Vec::new();
    while started.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(rss) = volume.lock().unwrap().pid().and_then(resident_kib) {
            memory.push((started.elapsed(), rss));
        }
        while events
            .last()
            .is_some_and(|(when, _)| started.elapsed() >= *when)
        {
            let (_, event) = events.pop().unwrap();
            log.push(format!("{:>6.0?} {event}", started.elapsed()));
            match event {
                "store away" => {
                    control.set_store_away(true);
                    relay.stop();
                }
                "store back" => {
                    relay.resume();
                    control.set_store_away(false);
                }
                _ => {
                    // Between operations (files closed), with changes still waiting to upload.
                    control.hold();
                    let mut volume = volume.lock().unwrap();
                    volume.kill();
                    volume.start(&options);
                    drop(volume);
                    control.release();
                }
            }
        }
        if writers.iter().any(|w| w.is_finished()) {
            let printed = volume.lock().unwrap().printed();
            if let Ok(keep) = std::env::var("CAIRN_STRESS_KEEP_LOG") {
                fs::write(&keep, &printed).expect("keep the mount's log");
            }
            let tail: Vec<&str> = printed.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "a writer stopped early, at {:.0?}; events:\n{}\nthe mount's last lines:\n{}",
                started.elapsed(),
                log.join("\n"),
                tail.join("\n")
            );
        }
    }
    control.stop.store(true, Ordering::SeqCst);
    let mut model = BTreeMap::new();
    for writer in writers {
        model.extend(writer.join().expect("a writer failed"));
    }
    let mut volume = Arc::try_unwrap(volume).ok().unwrap().into_inner().unwrap();
    volume.flush();

    // The store holds exactly the model.
    let direct = Direct::new(&server.spec(""));
    let prefix = volume.key("");
    let mut stored = BTreeMap::new();
    for key in direct.keys(&prefix) {
        let relative = &key[prefix.len()..];
        if relative.ends_with('/') || !relative.starts_with('w') {
            continue; // directory markers
        }
        stored.insert(relative.to_string(), direct.get(&key).unwrap().1);
    }
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>(),
        "the store's files and the model's differ"
    );
    for (path, bytes) in &model {
        assert!(stored[path] == *bytes, "{path} differs in the store");
    }
    volume.stop();

    // Memory: bounded, and not growing from the first half of the run to the second.
    let peak = memory.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
    let half = run_for / 2;
    let early = memory
        .iter()
        .filter(|(t, _)| *t < half)
        .map(|(_, k)| *k)
        .max();
    let late = memory
        .iter()
        .filter(|(t, _)| *t >= half)
        .map(|(_, k)| *k)
        .max();
    eprintln!(
        "stress: {seconds} s, {WRITERS} writers, {} operations ({} refused while the store was \
         away, then retried), {} MiB written, {} files at the end; mount RSS peak {} MiB (first \
         half {} MiB, second half {} MiB)\n{}",
        control.operations.load(Ordering::Relaxed),
        control.refused.load(Ordering::Relaxed),
        control.bytes_written.load(Ordering::Relaxed) >> 20,
        model.len(),
        peak >> 10,
        early.unwrap_or(0) >> 10,
        late.unwrap_or(0) >> 10,
        log.join("\n")
    );
    assert!(peak < 512 << 10, "the mount process peaked at {peak} KiB");
    if let (Some(early), Some(late)) = (early, late) {
        assert!(
            late < early * 2 + (64 << 10),
            "the mount process grew from {early} KiB to {late} KiB"
        );
    }
    assert!(!Path::new(&root.join("w0")).exists());
}
