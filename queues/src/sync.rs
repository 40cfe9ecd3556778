//! The synchronisation primitives the rings use, switched to loom's models under `--cfg loom` so
//! that `loom` can explore every interleaving (and every weak-memory outcome it models) of the
//! ring code. Code in other crates that provides doorbells to a ring should take them from here,
//! so that its own loom tests model them too.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU16, AtomicU32};
#[cfg(loom)]
pub use loom::sync::Arc;

#[cfg(not(loom))]
pub use core::sync::atomic::{AtomicU16, AtomicU32};
#[cfg(not(loom))]
pub use std::sync::Arc;

pub use core::sync::atomic::Ordering;
