//! The demo's other vCPUs. Once vCPU 0 runs on the demo's own address space (and has
//! unpinned the boot tables: the other vCPUs, still down, hold no root), it starts
//! every other vCPU with that root in its context. Each one checks that it runs on it,
//! reads its word of the heap through the heap's virtual address (mapped only in the
//! demo's address space), adds the word to a shared sum, writes a reply next to it,
//! prints a line and sleeps. vCPU 0 checks the sum and the replies.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_sdk::hv_abi::hypercall::VcpuContext;
use guest_sdk::hv_abi::mmu::PTE_ADDR_MASK;
use guest_sdk::hv_abi::shared_info::MAX_VCPUS;
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::{arch, println};

use crate::pv_mmu::{heap_word, AddressSpace, HEAP_VA};

const STACK_BYTES: usize = 16 << 10;
#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; STACK_BYTES]>);
// SAFETY: each stack is handed to exactly one secondary vCPU, which alone uses it.
unsafe impl Sync for Stack {}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_STACK: Stack = Stack(UnsafeCell::new([0; STACK_BYTES]));
/// One stack per secondary vCPU (vCPU `i` takes `STACKS[i - 1]`).
static STACKS: [Stack; MAX_VCPUS - 1] = [NEW_STACK; MAX_VCPUS - 1];

/// The root the secondaries must find in CR3.
static ROOT: AtomicU64 = AtomicU64::new(0);
/// Sum of the heap words the secondaries read.
static SUM: AtomicU64 = AtomicU64::new(0);
/// Secondaries that ran to the end of their work.
static DONE: AtomicU64 = AtomicU64::new(0);
/// Bit `i` set: vCPU `i` found another root in CR3.
static WRONG_ROOT: AtomicU64 = AtomicU64::new(0);

/// Offset of a secondary's reply in its heap page.
const REPLY: u64 = 8;

/// The reply vCPU `id` writes for heap word `word`.
fn reply_for(id: u64, word: u64) -> u64 {
    !word ^ (id << 56)
}

/// Entry point of a secondary vCPU (RDI = its id, from the context's `arg`).
extern "C" fn secondary(id: u64) -> ! {
    let cr3 = arch::read_cr3() & PTE_ADDR_MASK;
    if cr3 != ROOT.load(Ordering::Acquire) {
        WRONG_ROOT.fetch_or(1 << id, Ordering::AcqRel);
    }
    let page = HEAP_VA + id * PAGE_SIZE;
    // SAFETY: the heap is mapped at HEAP_VA in the demo's address space; vCPU 0 wrote
    // page `id` before starting this vCPU and does not touch it until DONE says so.
    let word = unsafe { core::ptr::read_volatile(page as *const u64) };
    // SAFETY: as above; the reply slot of page `id` belongs to this vCPU.
    unsafe { core::ptr::write_volatile((page + REPLY) as *mut u64, reply_for(id, word)) };
    SUM.fetch_add(word, Ordering::AcqRel);
    println!("  smp: vCPU {id} up on root {cr3:#x}, read heap word {word:#x} at {page:#x}");
    DONE.fetch_add(1, Ordering::AcqRel);
    loop {
        // Nothing will wake it: the domain ends when vCPU 0 powers off.
        let _ = guest_sdk::sched::block();
    }
}

/// Starts vCPUs 1.. on `space` and checks their work; returns what failed, if anything.
pub fn run(si: &StartInfo, space: &AddressSpace) -> Result<(), &'static str> {
    let n = u64::from(si.nr_vcpus).min(MAX_VCPUS as u64);
    if n < 2 {
        return Ok(());
    }
    ROOT.store(space.root, Ordering::Release);
    for id in 1..n {
        let ctx = VcpuContext {
            rip: secondary as *const () as u64,
            rsp: STACKS[id as usize - 1].0.get() as u64 + STACK_BYTES as u64 - 8,
            cr3: space.root,
            arg: id,
            reserved: [0; 4],
        };
        guest_sdk::vcpu_initialise(id as u32, &ctx).map_err(|_| "vcpu_initialise refused")?;
        // SAFETY: `secondary` never returns and uses only its own stack, its heap page
        // and atomics, all mapped by the root in the context.
        unsafe { guest_sdk::vcpu_up(id as u32) }.map_err(|_| "vcpu_up refused")?;
    }
    // Wait for them, yielding the physical CPUs; give up after a long while.
    let mut tries: u32 = 0;
    while DONE.load(Ordering::Acquire) != n - 1 {
        tries += 1;
        if tries > 4_000_000 {
            return Err("a secondary vCPU did not report");
        }
        let _ = guest_sdk::sched_yield();
    }
    let want: u64 = (1..n).map(heap_word).sum();
    let sum = SUM.load(Ordering::Acquire);
    let replies_ok = (1..n).all(|id| {
        // SAFETY: heap page `id`, identity-mapped for the kernel; its vCPU is done.
        let r = unsafe {
            core::ptr::read_volatile((space.heap + id * PAGE_SIZE + REPLY) as *const u64)
        };
        r == reply_for(id, heap_word(id))
    });
    let wrong = WRONG_ROOT.load(Ordering::Acquire);
    println!(
        "  smp: {} secondary vCPU(s) started on the demo's address space: sum of their heap words {sum:#x} (expected {want:#x}), replies {}, all on root {:#x}: {}",
        n - 1,
        if replies_ok { "ok" } else { "WRONG" },
        space.root,
        if sum == want && replies_ok && wrong == 0 { "ok" } else { "WRONG" }
    );
    if wrong != 0 {
        return Err("a secondary vCPU started on another root");
    }
    if sum != want || !replies_ok {
        return Err("the secondary vCPUs' work is wrong");
    }
    Ok(())
}
