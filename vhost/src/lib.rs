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

/// The vhost-user requests no Leap device supports (their protocol features are never offered,
/// so the `vhost` crate only passes them on from a front end that ignores that): each is
/// refused through the device's `refuse`, counted and logged. One list for every device.
macro_rules! refuse_unsupported_requests {
    () => {
        fn set_gpu_socket(&mut self, _gpu: vhost::vhost_user::GpuBackend) -> VuResult<()> {
            Err(self.refuse("GPU_SET_SOCKET is not supported".to_string()))
        }
        fn get_shared_object(
            &mut self,
            _uuid: vhost::vhost_user::message::VhostUserSharedMsg,
        ) -> VuResult<std::fs::File> {
            Err(self.refuse("GET_SHARED_OBJECT is not supported".to_string()))
        }
        fn get_max_mem_slots(&mut self) -> VuResult<u64> {
            Err(self.refuse("GET_MAX_MEM_SLOTS is not supported".to_string()))
        }
        fn add_mem_region(
            &mut self,
            _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
            _fd: std::fs::File,
            _postcopy: Option<bool>,
        ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
            Err(self.refuse("ADD_MEM_REG is not supported".to_string()))
        }
        fn remove_mem_region(
            &mut self,
            _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
        ) -> VuResult<()> {
            Err(self.refuse("REM_MEM_REG is not supported".to_string()))
        }
        fn set_device_state_fd(
            &mut self,
            _direction: vhost::vhost_user::message::VhostTransferStateDirection,
            _phase: vhost::vhost_user::message::VhostTransferStatePhase,
            _fd: std::fs::File,
        ) -> VuResult<Option<std::fs::File>> {
            Err(self.refuse("SET_DEVICE_STATE_FD is not supported".to_string()))
        }
        fn check_device_state(&mut self) -> VuResult<()> {
            Err(self.refuse("CHECK_DEVICE_STATE is not supported".to_string()))
        }
        fn get_shmem_config(
            &mut self,
        ) -> VuResult<vhost::vhost_user::message::VhostUserShMemConfig> {
            Err(self.refuse("GET_SHMEM_CONFIG is not supported".to_string()))
        }
        fn set_log_base(
            &mut self,
            _log: &vhost::vhost_user::message::VhostUserLog,
            _file: std::fs::File,
        ) -> VuResult<()> {
            Err(self.refuse("SET_LOG_BASE is not supported".to_string()))
        }
    };
}

pub mod agent;
pub mod chain;
pub mod config;
pub mod device;
pub mod inflight;
pub mod queue;
pub mod region;
pub mod relay;
mod ring_order;
pub mod server;
pub mod soc;
pub mod stats;

#[cfg(feature = "driver")]
pub mod driver;

pub use device::{BlkDevice, DeviceConfig, DeviceContext};
pub use server::{ServeError, Server, Session, StopHandle};
pub use stats::{Malformed, VhostStats};
