//! leap-queues: the NVMe vocabulary every part of Leap speaks.
//!
//! Front ends produce 64-byte submission entries ([`nvme::Sqe`]), back ends consume them and
//! produce 16-byte completion entries ([`nvme::Cqe`]). This crate holds the wire types, the rings
//! they travel on, the PRP and SGL walkers that turn a command's data pointer into address ranges,
//! and an in-process queue pair. It does no I/O, spawns no threads and knows nothing of virtio or
//! TCP.
//!
//! | module | what |
//! |---|---|
//! | [`nvme`] | SQE, CQE, status codes, opcodes, SGL descriptors, DSM ranges |
//! | [`identify`] | Identify Controller / Identify Namespace structures |
//! | [`ring`] | SQ/CQ rings over caller memory: doorbells, phase tag, Acquire/Release |
//! | [`prp`] | PRP1/PRP2/PRP list walker |
//! | [`sgl`] | SGL walker (segments, last segment, bit bucket, capsule offsets) |
//! | [`qpair`] | an in-process queue pair ([`queue_pair`]) with per-command capsules |
//! | [`sync`] | atomics switched to loom's under `--cfg loom` |

pub mod identify;
pub mod nvme;
pub mod prp;
pub mod qpair;
pub mod ring;
pub mod sgl;
pub mod sync;

pub use nvme::{Cqe, SglDescriptor, Sqe, Status};
pub use qpair::{queue_pair, Command, CompleteError, Processor, SubmitError, Submitter};
