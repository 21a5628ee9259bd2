//! Many idle domains in one hypervisor (the density benchmark's machinery): they all
//! boot, sleep in SCHEDOP_BLOCK, use no CPU to speak of, and are destroyed cleanly.

use std::time::Duration;

use tests::kvm_available;

#[test]
fn many_idle_domains_boot_sleep_and_are_destroyed() {
    if !kvm_available() {
        return;
    }
    let image = hv_core::KernelImage::from_elf(tests::demo_kernel()).expect("demo kernel");
    let r = hv_core::density::run(
        tests::kvm(),
        &image,
        "role=idle",
        24,
        4 << 20,
        Duration::from_millis(300),
    )
    .expect("density run");
    assert_eq!(r.domains, 24);
    // Every domain touched some of its RAM (kernel, stack, start_info) but far from all.
    assert!(r.touched_kib_per_domain > 16.0, "{r:?}");
    assert!(r.touched_kib_per_domain < 1024.0, "{r:?}");
    // Sleeping vCPUs cost nothing: well under one core for 24 domains.
    assert!(r.idle_cpu_percent < 50.0, "{r:?}");
}
