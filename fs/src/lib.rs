//! cairn-fs: the store layer (the [`store::Store`] trait and its backends), and in time the cache,
//! the write-back engine and the FUSE filesystem that present a volume's objects as files.

pub mod store;
