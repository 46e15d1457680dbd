//! cairn's integration tests, one binary (the shared helpers in [`common`] compile once): the
//! product end to end, as users run it. Real FUSE mounts of the real `cairn` binary, a real S3
//! server over HTTP (moto, started per test on a free loopback port), and a real dockerd with
//! real containers; they run as root with /dev/fuse (the README's test command sees to that).
//! One module per area; `cargo test --test integration MODULE::` runs one.

mod common;

mod cache;
mod crash;
mod direct;
mod docker;
mod durable;
mod faults;
mod hosts;
mod integrity;
mod interop;
mod mount_posix;
mod names;
mod plugin;
mod protocol_fuzz;
mod report;
mod snapshot;
mod store_check;
mod stress;
mod writeback;
