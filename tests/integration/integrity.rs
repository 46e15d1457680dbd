//! A long random read/write/truncate workload on one file through a real FUSE mount, checked
//! byte for byte against a local reference file after every read, after reopening, in the
//! store itself, and after a cold remount.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::Volume;

const OPERATIONS: usize = 3000;
const MAX_SIZE: u64 = 3 << 20;

fn open(path: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

fn check(file: &File, reference: &[u8], at: usize) {
    let mut actual = vec![0; reference.len()];
    file.read_exact_at(&mut actual, 0).unwrap();
    if actual != reference {
        let first = actual.iter().zip(reference).position(|(a, b)| a != b);
        panic!("after operation {at}: contents differ, first at byte {first:?}");
    }
    assert_eq!(
        file.metadata().unwrap().len(),
        reference.len() as u64,
        "after operation {at}: size"
    );
}

#[test]
fn random_reads_writes_and_truncates_match_a_reference_file() {
    let seed = std::env::var("CAIRN_INTEGRITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ca1e);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut volume = Volume::new(&[]);
    let path = volume.path("subject.bin");
    let mut reference: Vec<u8> = Vec::new();
    let mut file = open(&path);
    let (mut writes, mut truncates, mut reads, mut reopens) = (0, 0, 0, 0);

    for op in 0..OPERATIONS {
        match rng.random_range(0..100) {
            0..=54 => {
                let offset =
                    rng.random_range(0..=(reference.len() as u64 + 64 * 1024).min(MAX_SIZE));
                let len = rng.random_range(1..=64 * 1024usize);
                let byte: u8 = rng.random();
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                file.write_all_at(&data, offset).unwrap();
                let end = offset as usize + len;
                if reference.len() < end {
                    reference.resize(end, 0);
                }
                reference[offset as usize..end].copy_from_slice(&data);
                writes += 1;
            }
            55..=64 => {
                let size = rng.random_range(0..=MAX_SIZE) as usize;
                file.set_len(size as u64).unwrap();
                reference.resize(size, 0);
                truncates += 1;
            }
            65..=92 => {
                if reference.is_empty() {
                    continue;
                }
                let start = rng.random_range(0..reference.len());
                let len = rng.random_range(1..=(reference.len() - start).min(256 * 1024));
                let mut got = vec![0; len];
                file.read_exact_at(&mut got, start as u64).unwrap();
                assert!(
                    got == reference[start..start + len],
                    "read {start}+{len} at operation {op} (seed {seed})"
                );
                reads += 1;
            }
            93..=96 => file.sync_all().unwrap(),
            _ => {
                // Close (uploads) and open again: the kernel and cairn must agree with the reference.
                drop(file);
                file = open(&path);
                check(&file, &reference, op);
                reopens += 1;
            }
        }
    }
    check(&file, &reference, OPERATIONS);
    drop(file);
    println!(
        "{writes} writes, {truncates} truncates, {reads} reads, {reopens} reopens (seed {seed})"
    );
    assert!(writes > 1000 && truncates > 100 && reads > 500 && reopens > 50);

    // Once flushed, the store holds exactly the final version.
    volume.flush();
    let (_, stored) = volume
        .direct()
        .get(&volume.key("subject.bin"))
        .expect("the object");
    assert!(
        stored == reference,
        "the stored object differs from the reference"
    );

    // And a cold mount reads it back from the store alone.
    volume.remount_cold(&[]);
    check(
        &File::open(volume.path("subject.bin")).unwrap(),
        &reference,
        OPERATIONS,
    );
}
