//! cairn-driver: Docker's VolumeDriver protocol over a unix socket, the volume registry, and the
//! supervisor of per-volume mount processes.
//!
//! Empty for now: the plugin issue builds it on top of cairn-fs's store layer.
