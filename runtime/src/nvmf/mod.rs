//! NVMe over Fabrics on TCP: the PDU codec (pure functions on byte buffers), fabrics command and
//! data encodings, per-connection buffers, and the target built from them. Nothing here knows
//! about virtio; the target's connections are [`crate::Port`]s served by the pollers like any
//! other front end.

pub mod conn;
pub mod fabrics;
pub mod host;
pub mod initiator;
pub mod pdu;
pub mod pool;
pub mod target;
