//! leap-vhost: the vhost-user-blk front end of Leap.
//!
//! A stock hypervisor (QEMU, cloud-hypervisor) connects to a unix socket ([`server::Server`]) and
//! negotiates a virtio-blk device ([`device::BlkDevice`]). Each virtqueue is bound to one NVMe queue
//! pair on a poller ([`queue::BlkQueue`] implements the runtime's `Port`): requests become NVMe
//! commands whose data pointers describe guest memory, and completions become status bytes and used
//! elements. This crate does no storage work itself.
//!
//! With the `driver` feature, [`driver`] is the guest side: an in-process vhost-user frontend that
//! tests and benchmarks use to drive a device without a VM.

pub mod agent;
pub mod chain;
pub mod config;
pub mod device;
pub mod inflight;
pub mod queue;
pub mod region;
pub mod relay;
pub mod server;
pub mod soc;
pub mod stats;

#[cfg(feature = "driver")]
pub mod driver;

pub use device::{BlkDevice, DeviceConfig, DeviceContext};
pub use server::{ServeError, Server, StopHandle};
pub use stats::{Malformed, VhostStats};
