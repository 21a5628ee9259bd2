//! A domain's guest-physical layout, as arithmetic: where the page-table pool, the
//! grant window and the passthrough regions go for a given RAM size (SPEC §4.5). The
//! fixed frames (start_info, shared_info, grant table, device table, boot stack) are
//! `hv_abi::layout` constants.
//!
//! ```text
//! 0 .. ram_bytes                      RAM
//! pool_gpa_for(ram) .. pool_end       page-table pool (2 MiB aligned)
//! window_gpa_for(pool_end) ..         grant window (GRANT_WINDOW_FRAMES, 2 MiB aligned)
//! region_gpas(pool_end, sizes)        passthrough regions, each 2 MiB aligned
//! ```
//!
//! A leaf: depends on nothing else in hv-core.

use hv_abi::layout::{self, GRANT_WINDOW_FRAMES};
use hv_abi::PAGE_SIZE;

/// Size of the grant window in bytes.
pub const WINDOW_BYTES: u64 = GRANT_WINDOW_FRAMES as u64 * PAGE_SIZE;
/// Alignment of each passthrough region's guest-physical address.
pub const REGION_ALIGN: u64 = 2 << 20;

const _: () = assert!(layout::GRANT_WINDOW_ALIGN == REGION_ALIGN);

/// Guest-physical address of the page-table pool for `ram_bytes` of RAM.
pub fn pool_gpa_for(ram_bytes: u64) -> u64 {
    ram_bytes.div_ceil(layout::PT_POOL_ALIGN) * layout::PT_POOL_ALIGN
}

/// Guest-physical address of the grant window for a pool ending at `pool_end`.
pub fn window_gpa_for(pool_end: u64) -> u64 {
    pool_end.div_ceil(layout::GRANT_WINDOW_ALIGN) * layout::GRANT_WINDOW_ALIGN
}

/// Guest-physical addresses of regions of `sizes` bytes for a pool ending at
/// `pool_end` (after the grant window, each [`REGION_ALIGN`]-aligned, in order).
pub fn region_gpas(pool_end: u64, sizes: &[u64]) -> Vec<u64> {
    let mut next = window_gpa_for(pool_end) + WINDOW_BYTES;
    sizes
        .iter()
        .map(|s| {
            let gpa = next.div_ceil(REGION_ALIGN) * REGION_ALIGN;
            next = gpa + s;
            gpa
        })
        .collect()
}

/// The start of the first region for a pool ending at `pool_end`.
pub fn first_region_gpa(pool_end: u64) -> u64 {
    region_gpas(pool_end, &[PAGE_SIZE])[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_follow_each_other_aligned() {
        let ram = (3 << 20) + 4096;
        let pool = pool_gpa_for(ram);
        assert_eq!(pool, 4 << 20);
        let pool_end = pool + 300 * PAGE_SIZE;
        let w = window_gpa_for(pool_end);
        assert_eq!(w % REGION_ALIGN, 0);
        assert!(w >= pool_end);
        let g = region_gpas(pool_end, &[PAGE_SIZE, 3 << 20, 2 << 20]);
        assert_eq!(g[0], w + WINDOW_BYTES);
        assert_eq!(g[1], g[0] + REGION_ALIGN);
        assert_eq!(g[2], g[1] + (4 << 20));
        assert_eq!(first_region_gpa(pool_end), g[0]);
    }
}
