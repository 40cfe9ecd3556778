//! The memory orderings leapd relies on when it serves a split virtqueue, stated and checked
//! with loom. They matter most in the SoC modes: the ring lives in a window onto host memory,
//! the driver is a tenant vCPU on another machine's CPU, and leapd runs on ARM, whose weak
//! ordering allows every reordering the rules below forbid.
//!
//! The ring is served by virtio-queue's `Queue` over the mapped memory; `BlkQueue`
//! (`queue.rs`) decides when to sleep and when to interrupt. The orderings, as virtio-queue 0.18
//! implements them and as the virtio spec (2.7.7, 2.7.10, 2.7.13) requires:
//!
//! 1. **Requests.** The driver writes descriptors and the avail entry, then stores `avail.idx`
//!    (Release / a write barrier). The device loads `avail.idx` with Acquire (`Queue::iter`)
//!    before it reads the entries and descriptors it covers.
//! 2. **Completions.** The device writes the used element, then stores `used.idx` with Release
//!    (`add_used`). The driver loads `used.idx` (Acquire / read barrier) before the element.
//! 3. **Sleeping without missing a kick** (`BlkQueue::arm`, `enable_notification`): the device
//!    publishes `avail_event` (Relaxed), issues a SeqCst fence, and re-reads `avail.idx`; it
//!    sleeps only if nothing new is there. The driver stores `avail.idx`, issues a full barrier,
//!    then reads `avail_event` to decide whether to kick. The two fences make it impossible for
//!    both to miss each other's store (the store-buffer pattern): either the device sees the
//!    request, or the driver sees the device is waiting and kicks.
//! 4. **Interrupting without missing a completion** (`needs_notification`): the device stores
//!    `used.idx`, SeqCst fence, reads `used_event`; the driver publishes `used_event`, full
//!    barrier, re-reads `used.idx` before it waits for an interrupt.
//!
//! The models below run these exact sequences (one request, one completion) under loom with
//! every interleaving and every weak-memory outcome loom explores, and check that data read
//! after the index is the data written before it and that nobody sleeps through work. Each
//! fence is also removed once to show loom finds the lost wakeup: the checks can fail.

#[cfg(test)]
mod tests {
    use loom::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, Ordering};
    use loom::sync::Arc;

    /// The ring words both sides touch (one request slot, one used slot).
    #[derive(Default)]
    struct Ring {
        desc_data: AtomicU32,
        avail_ring0: AtomicU16,
        avail_idx: AtomicU16,
        avail_event: AtomicU16,
        used_elem0: AtomicU32,
        used_idx: AtomicU16,
        used_event: AtomicU16,
        kicked: AtomicBool,
        interrupted: AtomicBool,
    }

    /// virtio's vring_need_event: notify if `event` lies in [old, new).
    fn need_event(event: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// The driver submits one request (rule 1) and decides whether to kick (rule 3).
    fn driver_submits(r: &Ring, with_fence: bool) {
        r.desc_data.store(0xfeed, Ordering::Relaxed);
        r.avail_ring0.store(0, Ordering::Relaxed);
        r.avail_idx.store(1, Ordering::Release);
        if with_fence {
            fence(Ordering::SeqCst);
        }
        if need_event(r.avail_event.load(Ordering::Relaxed), 1, 0) {
            r.kicked.store(true, Ordering::Release);
        }
    }

    /// The device, idle at avail 0, arms (rule 3): true if it found the request (and read it
    /// per rule 1), false if it went to sleep.
    fn device_arms(r: &Ring, with_fence: bool) -> bool {
        r.avail_event.store(0, Ordering::Relaxed);
        if with_fence {
            fence(Ordering::SeqCst);
        }
        if r.avail_idx.load(Ordering::Relaxed) == 0 {
            return false;
        }
        // Queue::iter: Acquire, then the entries.
        assert_eq!(r.avail_idx.load(Ordering::Acquire), 1);
        assert_eq!(r.avail_ring0.load(Ordering::Relaxed), 0);
        assert_eq!(
            r.desc_data.load(Ordering::Relaxed),
            0xfeed,
            "stale descriptor"
        );
        true
    }

    fn kick_model(with_fence: bool) {
        loom::model(move || {
            let r = Arc::new(Ring {
                // The device had consumed nothing and asked to hear about entry 0.
                avail_event: AtomicU16::new(0xffff),
                ..Default::default()
            });
            let d = {
                let r = r.clone();
                loom::thread::spawn(move || driver_submits(&r, with_fence))
            };
            let found = device_arms(&r, with_fence);
            d.join().unwrap();
            assert!(
                found || r.kicked.load(Ordering::Acquire),
                "the device slept through a request nobody kicked"
            );
        });
    }

    #[test]
    fn loom_the_device_never_sleeps_through_a_request() {
        kick_model(true);
    }

    #[test]
    fn loom_without_the_fences_a_kick_is_lost() {
        let r = std::panic::catch_unwind(|| kick_model(false));
        assert!(r.is_err(), "loom found no lost kick without the fences");
    }

    /// The device completes one request (rule 2) and decides whether to interrupt (rule 4).
    fn device_completes(r: &Ring, with_fence: bool) {
        r.used_elem0.store(0x0c0de, Ordering::Relaxed);
        r.used_idx.store(1, Ordering::Release);
        if with_fence {
            fence(Ordering::SeqCst);
        }
        if need_event(r.used_event.load(Ordering::Relaxed), 1, 0) {
            r.interrupted.store(true, Ordering::Release);
        }
    }

    /// The driver, having consumed nothing, re-enables interrupts (rule 4): true if it found
    /// the completion (and read it per rule 2), false if it waits for an interrupt.
    fn driver_waits(r: &Ring, with_fence: bool) -> bool {
        r.used_event.store(0, Ordering::Relaxed);
        if with_fence {
            fence(Ordering::SeqCst);
        }
        if r.used_idx.load(Ordering::Acquire) == 0 {
            return false;
        }
        assert_eq!(
            r.used_elem0.load(Ordering::Relaxed),
            0x0c0de,
            "stale used element"
        );
        true
    }

    fn interrupt_model(with_fence: bool) {
        loom::model(move || {
            let r = Arc::new(Ring {
                used_event: AtomicU16::new(0xffff),
                ..Default::default()
            });
            let dev = {
                let r = r.clone();
                loom::thread::spawn(move || device_completes(&r, with_fence))
            };
            let found = driver_waits(&r, with_fence);
            dev.join().unwrap();
            assert!(
                found || r.interrupted.load(Ordering::Acquire),
                "the driver waits for an interrupt that never comes"
            );
        });
    }

    #[test]
    fn loom_the_driver_never_misses_a_completion() {
        interrupt_model(true);
    }

    #[test]
    fn loom_without_the_fences_an_interrupt_is_lost() {
        let r = std::panic::catch_unwind(|| interrupt_model(false));
        assert!(
            r.is_err(),
            "loom found no lost interrupt without the fences"
        );
    }
}
