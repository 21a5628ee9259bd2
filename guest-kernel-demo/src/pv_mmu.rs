//! The PV MMU in action: the demo builds its own address space with batched
//! `mmu_update`s, switches to it, drops the boot tables, runs a ring-3 task through
//! mappings the hypervisor validated, remaps the task's data page and shows the task
//! reading the new frame. Kernel pages are supervisor-only: the task cannot read them.

use core::cell::UnsafeCell;

use guest_sdk::hv_abi::mmu::{MmuUpdate, PTE_P, PTE_U, PTE_W, UVMF_INVLPG};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::user::{self, Idt};
use guest_sdk::{mmu, println};

/// Kernel memory stays identity-mapped (supervisor-only) up to here.
const IDENTITY_END: u64 = 4 << 20;
/// The heap's virtual address and size (at least one page per vCPU: [`crate::smp`]).
pub const HEAP_VA: u64 = 0x2000_0000;
const HEAP_PAGES: u64 = 64;
const _: () = assert!(HEAP_PAGES as usize >= guest_sdk::hv_abi::shared_info::MAX_VCPUS);
/// The ring-3 task's pages: code, data (read), result (written), stack.
const USER_BASE: u64 = 0x4000_0000;
const USER_DATA: u64 = USER_BASE + 0x1000;
const USER_RESULT: u64 = USER_BASE + 0x2000;
const USER_STACK_TOP: u64 = USER_BASE + 0x4000;

const MAX_BATCH: usize = 2048;

struct Global<T>(UnsafeCell<T>);
// SAFETY: only vCPU 0 uses these (the other vCPUs run [`crate::smp`], which does not).
unsafe impl<T> Sync for Global<T> {}

static REQS: Global<[MmuUpdate; MAX_BATCH]> =
    Global(UnsafeCell::new([MmuUpdate { ptr: 0, val: 0 }; MAX_BATCH]));
static IDT: Idt = Idt::new();
#[repr(C, align(16))]
struct Stack([u8; 16384]);
static EXCEPTION_STACK: Global<Stack> = Global(UnsafeCell::new(Stack([0; 16384])));

extern "C" {
    fn demo_task();
    fn demo_task_peek();
}

core::arch::global_asm!(
    ".pushsection .text.demo_task, \"ax\"",
    ".balign 4096",
    ".global demo_task",
    "demo_task:",
    "    mov rax, qword ptr [{data}]",
    "    mov qword ptr [{result}], rax",
    "    ud2",
    ".global demo_task_peek",
    "demo_task_peek:",
    "    mov rax, qword ptr [{kernel}]",
    "    ud2",
    ".popsection",
    data = const USER_DATA,
    result = const USER_RESULT,
    kernel = const 0x10_0000u64,
);

/// Builds page tables in fresh pool frames through batched `mmu_update`s. The frames
/// are not page tables yet, so the hypervisor stores the entries as they are; pinning
/// the root validates the whole tree at once.
struct Builder<'a> {
    reqs: &'a mut [MmuUpdate; MAX_BATCH],
    n: usize,
    frames: mmu::PtFrames,
    root: u64,
    cache: [(u8, u64, u64); 32],
    cached: usize,
    entries: usize,
    batches: usize,
    tables: usize,
}

impl Builder<'_> {
    fn alloc(&mut self) -> Result<u64, &'static str> {
        let f = self.frames.alloc().ok_or("page-table pool exhausted")?;
        self.tables += 1;
        Ok(f)
    }

    fn push(&mut self, ptr: u64, val: u64) -> Result<(), &'static str> {
        if self.n == MAX_BATCH {
            self.flush()?;
        }
        self.reqs[self.n] = MmuUpdate { ptr, val };
        self.n += 1;
        self.entries += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), &'static str> {
        if self.n == 0 {
            return Ok(());
        }
        // SAFETY: the requests only write fresh pool frames, which map nothing yet.
        let (done, r) = unsafe { mmu::mmu_update(&self.reqs[..self.n]) };
        if r.is_err() || done as usize != self.n {
            return Err("mmu_update refused a request");
        }
        self.n = 0;
        self.batches += 1;
        Ok(())
    }

    /// The table one level down from `parent` at `index` (created on first use).
    fn child(&mut self, parent: u64, index: u64, key: (u8, u64)) -> Result<u64, &'static str> {
        if let Some(&(_, _, f)) = self.cache[..self.cached]
            .iter()
            .find(|(l, k, _)| (*l, *k) == key)
        {
            return Ok(f);
        }
        let f = self.alloc()?;
        self.push(parent + index * 8, f | PTE_P | PTE_W | PTE_U)?;
        if self.cached == self.cache.len() {
            return Err("too many tables for the demo");
        }
        self.cache[self.cached] = (key.0, key.1, f);
        self.cached += 1;
        Ok(f)
    }

    fn map(&mut self, va: u64, pa: u64, flags: u64) -> Result<(), &'static str> {
        let l3 = self.child(self.root, (va >> 39) & 511, (3, va >> 39))?;
        let l2 = self.child(l3, (va >> 30) & 511, (2, va >> 30))?;
        let l1 = self.child(l2, (va >> 21) & 511, (1, va >> 21))?;
        self.push(l1 + ((va >> 12) & 511) * 8, pa | flags)
    }
}

fn read(pa: u64) -> u64 {
    // SAFETY: `pa` is identity-mapped kernel memory.
    unsafe { core::ptr::read_volatile(pa as *const u64) }
}

fn write(pa: u64, v: u64) {
    // SAFETY: `pa` is identity-mapped, writable kernel memory owned by the demo.
    unsafe { core::ptr::write_volatile(pa as *mut u64, v) }
}

/// The word the heap check leaves at the start of heap page `i`.
pub fn heap_word(i: u64) -> u64 {
    0x4845_4150_0000 + i
}

/// The address space the demo built and runs on.
pub struct AddressSpace {
    /// Its root (a pinned L4).
    pub root: u64,
    /// Guest-physical address of the heap's first page (mapped at [`HEAP_VA`]).
    pub heap: u64,
}

/// Runs the demo; returns the address space it switched to, or a description of what
/// failed.
pub fn show(si: &StartInfo) -> Result<AddressSpace, &'static str> {
    let pool_end = si.pt_pool_gpa + si.pt_pool_frames * PAGE_SIZE;
    let mut next_ram = (si.first_free_gpa + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let mut ram = || {
        let f = next_ram;
        next_ram += PAGE_SIZE;
        f
    };
    let heap: u64 = ram();
    for _ in 1..HEAP_PAGES {
        ram();
    }
    let (data1, data2, result, stack) = (ram(), ram(), ram(), ram());
    if next_ram > IDENTITY_END {
        return Err("the demo's frames do not fit below 4 MiB");
    }
    let code = demo_task as *const () as u64 & !(PAGE_SIZE - 1);

    // SAFETY: REQS is used by this function only, on vCPU 0.
    let reqs = unsafe { &mut *REQS.0.get() };
    let mut b = Builder {
        reqs,
        n: 0,
        frames: mmu::PtFrames::from_start_info(si),
        root: 0,
        cache: [(0, 0, 0); 32],
        cached: 0,
        entries: 0,
        batches: 0,
        tables: 0,
    };
    b.root = b.alloc()?;
    // The kernel: identity, supervisor-only. The page-table pool: read-only.
    let mut pa = PAGE_SIZE;
    while pa < IDENTITY_END {
        b.map(pa, pa, PTE_P | PTE_W)?;
        pa += PAGE_SIZE;
    }
    let mut pt = si.pt_pool_gpa;
    while pt < pool_end {
        b.map(pt, pt, PTE_P)?;
        pt += PAGE_SIZE;
    }
    for i in 0..HEAP_PAGES {
        b.map(HEAP_VA + i * PAGE_SIZE, heap + i * PAGE_SIZE, PTE_P | PTE_W)?;
    }
    b.map(USER_BASE, code, PTE_P | PTE_U)?;
    b.map(USER_DATA, data1, PTE_P | PTE_U)?;
    b.map(USER_RESULT, result, PTE_P | PTE_W | PTE_U)?;
    b.map(USER_STACK_TOP - PAGE_SIZE, stack, PTE_P | PTE_W | PTE_U)?;
    b.flush()?;
    mmu::pin_table(4, b.root).map_err(|_| "pinning the new root failed validation")?;
    // SAFETY: the new tables map the kernel exactly as the boot tables did.
    unsafe { mmu::new_baseptr(b.root) }.map_err(|_| "new_baseptr refused")?;
    // SAFETY: nothing uses the boot tables any more: vCPU 0 left them, and the other
    // vCPUs are down, so they hold no root (SPEC 8.4).
    unsafe { mmu::unpin_table(si.pt_base_gpa) }.map_err(|_| "unpinning the boot tables failed")?;
    println!(
        "  pv mmu: built an address space of {} entries ({} page tables) in {} mmu_update batch(es), \
         pinned it, switched with new_baseptr, unpinned the boot tables",
        b.entries, b.tables, b.batches
    );

    // The heap works through its new virtual address.
    for i in 0..HEAP_PAGES {
        write(HEAP_VA + i * PAGE_SIZE, heap_word(i));
    }
    let ok = (0..HEAP_PAGES).all(|i| read(heap + i * PAGE_SIZE) == heap_word(i));
    println!(
        "  pv mmu: heap of {HEAP_PAGES} pages at {HEAP_VA:#x}: {}",
        if ok { "ok" } else { "WRONG" }
    );
    if !ok {
        return Err("heap mapping does not reach its frames");
    }

    // A ring-3 task reads its data page; the kernel remaps it; the task reads again.
    write(data1, 0x1111_1111_1111_1111);
    write(data2, 0x2222_2222_2222_2222);
    let exc_top = EXCEPTION_STACK.0.get() as u64 + core::mem::size_of::<Stack>() as u64;
    // SAFETY: the IDT and the exception stack are reserved for this; the task's pages
    // are user-accessible and the kernel's are not.
    unsafe { user::install(&IDT, exc_top) };
    let entry = USER_BASE + (demo_task as *const () as u64 - code);
    let run = || {
        // SAFETY: see above.
        let exit = unsafe { user::run_user(entry, USER_STACK_TOP - 8) };
        (exit.vector, read(result))
    };
    let (v1, first) = run();
    println!("  pv mmu: ring-3 task (exit vector {v1}) read {first:#x}");
    // SAFETY: only the (stopped) task uses this page.
    unsafe { mmu::update_va_mapping(USER_DATA, data2 | PTE_P | PTE_U, UVMF_INVLPG) }
        .map_err(|_| "update_va_mapping refused")?;
    let (v2, second) = run();
    println!("  pv mmu: remapped its data page; ring-3 task (exit vector {v2}) read {second:#x}");
    let peek = USER_BASE + (demo_task_peek as *const () as u64 - code);
    // SAFETY: as above; the task only tries to read a kernel page.
    let exit = unsafe { user::run_user(peek, USER_STACK_TOP - 8) };
    println!(
        "  pv mmu: ring-3 read of kernel memory at 0x100000: exception {} (page fault), cr2 {:#x}",
        exit.vector, exit.cr2
    );
    if first != 0x1111_1111_1111_1111 || second != 0x2222_2222_2222_2222 || exit.vector != 14 {
        return Err("the ring-3 task saw the wrong memory");
    }
    Ok(AddressSpace { root: b.root, heap })
}
