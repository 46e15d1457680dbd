//! cairn-fs: the store layer (the [`store::Store`] trait and its backends), the local cache, and
//! the filesystem that presents a volume's objects as files: async logic in [`fs`], a thin FUSE
//! adapter in [`fuse`], and [`mount`] to wire a session.

pub mod attrs;
pub mod cache;
pub mod control;
pub mod error;
pub mod fs;
pub mod fsync_log;
pub mod fuse;
pub mod journal;
pub mod lease;
pub mod metrics;
pub mod mount;
pub mod namespace;
pub mod store;
