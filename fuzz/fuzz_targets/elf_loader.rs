//! Fuzzes the ELF loader with arbitrary files: it must refuse or accept, never panic,
//! and an accepted image must respect the loader's rules.
#![no_main]

use hv_core::loader::KernelImage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = KernelImage::from_elf(data) {
        assert!(img.start() >= hv_abi::layout::KERNEL_MIN_GPA);
        for w in img.segments.windows(2) {
            assert!(w[0].gpa + w[0].mem_size <= w[1].gpa);
        }
        for s in &img.segments {
            assert!(s.data.len() as u64 <= s.mem_size);
        }
        let _ = img.check_abi(hv_core::FEATURES);
        let _ = img.check_fits(64 << 20);
    }
});
