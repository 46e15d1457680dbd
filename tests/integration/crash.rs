//! Crash recovery: a mixed workload runs against a real mount, the mount process is killed with
//! SIGKILL at a random moment, and a new one starts on the same cache directory. Everything that
//! was closed or fsynced before the kill is there after the restart, and once drained, the store
//! holds exactly the tree of a model of the workload. Twenty kills in a row. Also: what files
//! still open for writing at a kill come back as.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::Volume;
use cairn_testkit::S3Server;

const KILLS: usize = 20;
const DIRS: [&str; 4] = ["", "d1", "d2", "d1/e"];
const MOUNT_ARGS: [&str; 2] = ["--writeback-delay", "0.3"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

type Tree = BTreeMap<String, Node>;

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// The tree as the mount shows it.
fn observe(root: &Path) -> Tree {
    let mut tree = Tree::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(root.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let path = join(&dir, &entry.file_name().to_string_lossy());
            if entry.file_type().unwrap().is_dir() {
                tree.insert(path.clone(), Node::Dir);
                stack.push(path);
            } else {
                tree.insert(
                    path.clone(),
                    Node::File(fs::read(root.join(&path)).unwrap()),
                );
            }
        }
    }
    tree
}

/// Closes `file`, saying whether close() succeeded: a mount killed while it handles the close
/// fails it, and the file's last contents are then not promised (dropping a `File` would
/// ignore that failure and count the step as done).
fn close(file: fs::File) -> std::io::Result<()> {
    // SAFETY: the descriptor comes out of `file`, which no longer closes it; closed once here.
    if unsafe { libc::close(file.into_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One step of the workload, chosen against the model; returns the paths it touches.
fn step(rng: &mut StdRng, root: &Path, model: &Mutex<Tree>) -> Result<(), Vec<String>> {
    let snapshot = model.lock().unwrap().clone();
    let dirs: Vec<&str> = DIRS
        .iter()
        .copied()
        .filter(|d| d.is_empty() || snapshot.get(*d) == Some(&Node::Dir))
        .collect();
    let files: Vec<String> = snapshot
        .iter()
        .filter(|(_, n)| matches!(n, Node::File(_)))
        .map(|(p, _)| p.clone())
        .collect();
    let dir = dirs[rng.random_range(0..dirs.len())];
    let path = join(dir, &format!("f{}", rng.random_range(0..6)));
    match rng.random_range(0..100) {
        0..=44 => {
            if snapshot.get(&path) == Some(&Node::Dir) {
                return Ok(());
            }
            let len = rng.random_range(0..64 * 1024);
            let byte: u8 = rng.random();
            let body: Vec<u8> = (0..len).map(|i| byte.wrapping_add((i / 7) as u8)).collect();
            let fsync = rng.random_bool(0.3);
            let wrote = (|| {
                let mut file = fs::File::create(root.join(&path))?;
                file.write_all(&body)?;
                if fsync {
                    file.sync_all()?;
                }
                close(file)
            })();
            wrote.map_err(|_| vec![path.clone()])?;
            model.lock().unwrap().insert(path, Node::File(body));
        }
        45..=59 => {
            let missing: Vec<&str> = DIRS[1..]
                .iter()
                .copied()
                .filter(|d| {
                    !snapshot.contains_key(*d)
                        && (parent(d).is_empty() || snapshot.get(parent(d)) == Some(&Node::Dir))
                })
                .collect();
            if let Some(new) = missing.first() {
                fs::create_dir(root.join(new)).map_err(|_| vec![new.to_string()])?;
                model.lock().unwrap().insert(new.to_string(), Node::Dir);
            }
        }
        60..=74 => {
            if let Some(victim) = files.get(rng.random_range(0..files.len().max(1))) {
                fs::remove_file(root.join(victim)).map_err(|_| vec![victim.clone()])?;
                model.lock().unwrap().remove(victim);
            }
        }
        75..=92 => {
            if let Some(source) = files.get(rng.random_range(0..files.len().max(1))) {
                if snapshot.get(&path) == Some(&Node::Dir) || *source == path {
                    return Ok(());
                }
                fs::rename(root.join(source), root.join(&path))
                    .map_err(|_| vec![source.clone(), path.clone()])?;
                let mut model = model.lock().unwrap();
                let moved = model.remove(source).expect("the source was a file");
                model.insert(path, moved);
            }
        }
        _ => {
            let empty: Vec<&str> = DIRS[1..]
                .iter()
                .copied()
                .filter(|d| {
                    snapshot.get(*d) == Some(&Node::Dir)
                        && !snapshot.keys().any(|k| k.starts_with(&format!("{d}/")))
                })
                .collect();
            if let Some(gone) = empty.first() {
                fs::remove_dir(root.join(gone)).map_err(|_| vec![gone.to_string()])?;
                model.lock().unwrap().remove(*gone);
            }
        }
    }
    Ok(())
}

/// The paths where two trees differ, briefly (file contents by length and first byte).
fn differences(actual: &Tree, expected: &Tree) -> String {
    let brief = |node: Option<&Node>| match node {
        None => "absent".to_string(),
        Some(Node::Dir) => "a directory".to_string(),
        Some(Node::File(body)) => {
            format!("a file of {} bytes starting {:?}", body.len(), body.first())
        }
    };
    let paths: std::collections::BTreeSet<&String> = actual.keys().chain(expected.keys()).collect();
    paths
        .into_iter()
        .filter(|p| actual.get(*p) != expected.get(*p))
        .map(|p| {
            format!(
                "{p}: is {}, expected {}",
                brief(actual.get(p)),
                brief(expected.get(p))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// After a restart, takes what the mount shows for the paths the interrupted step touched:
/// the step may or may not have happened, or (a file being written) happened in part.
fn adopt(model: &mut Tree, seen: &Tree, uncertain: &[String]) {
    for path in uncertain {
        match seen.get(path) {
            Some(node) => {
                model.insert(path.clone(), node.clone());
            }
            None => {
                model.remove(path);
            }
        }
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing_that_was_closed_or_fsynced() {
    let seed = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x000c_4a54_u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = S3Server::shared().spec(&S3Server::unique_prefix("crash"));
    let mut volume = Volume::mount(&spec, &MOUNT_ARGS);
    let model = Arc::new(Mutex::new(Tree::new()));
    let mut interrupted = 0;

    for kill in 0..KILLS {
        let root = volume.mountpoint.clone();
        let (worker_model, mut worker_rng) =
            (Arc::clone(&model), StdRng::seed_from_u64(rng.random()));
        let worker = std::thread::spawn(move || {
            for _ in 0..10_000 {
                if let Err(uncertain) = step(&mut worker_rng, &root, &worker_model) {
                    return uncertain;
                }
            }
            Vec::new()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        volume.kill();
        let uncertain = worker.join().unwrap();
        interrupted += usize::from(!uncertain.is_empty());

        volume.start(&MOUNT_ARGS);
        let seen = observe(&volume.mountpoint);
        let mut model = model.lock().unwrap();
        adopt(&mut model, &seen, &uncertain);
        assert!(
            seen == *model,
            "after kill {kill} (seed {seed}), the mount differs from the model: {}",
            differences(&seen, &model)
        );
    }
    assert!(
        interrupted >= KILLS / 2,
        "most kills land in the middle of a step ({interrupted})"
    );

    // Drained, the store holds the same tree: directories as markers, files as objects.
    volume.stop();
    let store = volume.direct();
    let prefix = volume.key("");
    let mut stored = Tree::new();
    for key in store.keys(&prefix) {
        let path = key[prefix.len()..].to_string();
        match path.strip_suffix('/') {
            Some(dir) => stored.insert(dir.to_string(), Node::Dir),
            None => stored.insert(path, Node::File(store.get(&key).unwrap().1)),
        };
    }
    let model = model.lock().unwrap();
    assert!(
        stored == *model,
        "after the last drain (seed {seed}), the store differs from the model: {}",
        differences(&stored, &model)
    );
}

/// A file still open for writing when the mount is killed: one that open created comes back
/// with what was written; one that existed comes back either as last closed or as the writes
/// left it, nothing else (docs/SEMANTICS.md, the write-back engine); the store then holds what
/// the mount shows.
#[test]
fn files_open_for_writing_at_a_kill_come_back_as_closed_or_as_written() {
    let mut volume = Volume::new(&["--writeback-delay", "0.3"]);
    const CLOSED: &[u8] = b"closed version";
    for name in ["rewritten", "patched"] {
        fs::write(volume.path(name), CLOSED).unwrap();
    }
    volume.flush();
    let mut created = fs::File::create(volume.path("created")).unwrap();
    created.write_all(b"created, never closed").unwrap();
    let mut rewritten = fs::File::create(volume.path("rewritten")).unwrap();
    rewritten.write_all(b"rewritten, never closed").unwrap();
    let patched = fs::OpenOptions::new()
        .write(true)
        .open(volume.path("patched"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&patched, b"PATCHED", 0).unwrap();
    volume.kill();
    drop((created, rewritten, patched));

    volume.start(&[]);
    let shown = |name: &str| fs::read(volume.path(name)).unwrap();
    assert_eq!(shown("created"), b"created, never closed");
    let rewritten = shown("rewritten");
    assert!(
        rewritten == CLOSED || rewritten == b"rewritten, never closed",
        "a rewritten file comes back as closed or as written, not {:?}",
        String::from_utf8_lossy(&rewritten)
    );
    let patched = shown("patched");
    assert!(
        patched == CLOSED || patched == b"PATCHED version",
        "a patched file comes back as closed or as written, not {:?}",
        String::from_utf8_lossy(&patched)
    );
    volume.flush();
    let store = volume.direct();
    for (name, bytes) in [
        ("created", &b"created, never closed"[..]),
        ("rewritten", &rewritten),
        ("patched", &patched),
    ] {
        assert_eq!(
            store
                .get(&volume.key(name))
                .map(|(_, body)| body)
                .as_deref(),
            Some(bytes),
            "{name}: the store holds what the mount showed"
        );
    }
}
