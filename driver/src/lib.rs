//! cairn-driver: Docker's VolumeDriver protocol over a unix socket (server, protocol), the
//! volumes behind it (volumes, with their records in the store and the local registry), and the
//! supervisor of per-volume mount processes.

pub mod client;
pub mod config;
pub mod metrics;
pub mod names;
pub mod options;
pub mod protocol;
pub mod records;
pub mod registry;
pub mod server;
pub mod snapshots;
pub mod supervisor;
pub mod volumes;
