//! leap-runtime: address spaces, pollers and storage back ends.
//!
//! The runtime executes NVMe commands. Front ends hand it commands on in-process queue pairs
//! through the [`Port`] trait; a [`Poller`] thread runs them to completion against a
//! [`backend::Backend`], translating guest addresses through an [`AddressSpace`]. Nothing here
//! knows about virtio or the command line.

pub mod addr;
pub mod backend;
pub mod controller;
pub mod eventfd;
pub mod exec;
pub mod mem;
mod notify;
pub mod nvmf;
pub mod poller;
pub mod ratelimit;
pub mod stats;
pub mod throttle;
pub mod window;

pub use addr::{AddrError, AddressSpace, Piece, Region};
pub use controller::{AdminOutcome, Controller, ControllerConfig, ControllerKind, PropertyEffect};
pub use exec::{Namespace, Namespaces};
pub use notify::Notifier;
pub use poller::{PairId, Poller, PollerConfig, PollerError, PollerStats, Port, Waker};
pub use stats::{DeviceIoStats, IoStats};
