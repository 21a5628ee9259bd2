//! Links the kernel with the SDK's linker script (see `guest_build::link_guest_kernel`).

fn main() {
    guest_build::link_guest_kernel();
}
