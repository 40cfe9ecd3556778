//! leap-queues: the NVMe vocabulary every part of Leap speaks.
//!
//! Front ends produce 64-byte submission entries ([`nvme::Sqe`]), back ends consume them and
//! produce 16-byte completion entries ([`nvme::Cqe`]). This crate holds the wire types, the rings
//! they travel on, the PRP and SGL walkers that turn a command's data pointer into address ranges,
//! and an in-process queue pair. It does no I/O, spawns no threads and knows nothing of virtio or
//! TCP.

pub mod nvme;

pub use nvme::{Cqe, SglDescriptor, Sqe, Status};
