//! Passthrough regions (SPEC.md §8.9.7): guest-physical memory backed by a host file
//! mapped shared, standing for a device's memory. Loads and stores reach it directly
//! (no exits); the boot page tables identity-map it, writable, user-accessible.
//!
//! The host (or the device the region stands for) may read and write the memory at
//! any time, so a [`Region`] gives only a volatile view ([`VolatileSlice`]), never Rust
//! references.

use crate::devices::{Device, DeviceTable, DEV_PASSTHROUGH};
use crate::volatile::VolatileSlice;

use hv_abi::PAGE_SIZE;

/// A passthrough region of the device table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    index: u32,
    base: u64,
    size: u64,
}

impl Region {
    /// The region device `dev` describes, if it is a passthrough region with a
    /// page-aligned, non-empty, non-wrapping range.
    pub fn from_device(dev: &Device) -> Option<Region> {
        let (base, size) = (dev.entry.base, dev.entry.size);
        let ok = dev.kind() == DEV_PASSTHROUGH
            && base != 0
            && base % PAGE_SIZE == 0
            && size != 0
            && base.checked_add(size).is_some()
            && usize::try_from(size).is_ok();
        ok.then_some(Region {
            index: dev.index,
            base,
            size,
        })
    }

    /// The `nth` (from 0) passthrough region of `table`.
    pub fn find(table: &DeviceTable, nth: usize) -> Option<Region> {
        table
            .find(DEV_PASSTHROUGH, nth)
            .and_then(|d| Region::from_device(&d))
    }

    /// The device index.
    pub const fn device(&self) -> u32 {
        self.index
    }

    /// The region's guest-physical (and, in the boot address space, virtual) address.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub const fn len(&self) -> u64 {
        self.size
    }

    /// True if the region is empty (never, for a region from the table).
    pub const fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// A volatile view of the whole region, through the boot identity map.
    ///
    /// # Safety
    /// The region must still be mapped at its guest-physical address in the current
    /// address space (true on the boot page tables) for as long as the view is used.
    pub unsafe fn view(&self) -> VolatileSlice<'static> {
        // SAFETY: the hypervisor mapped the region at `base` (device table), the caller
        // vouches that the mapping is still in place; it is shared memory, hence the
        // volatile view.
        unsafe { VolatileSlice::new(self.base as *mut u8, self.size as usize) }
    }
}
