//! Scenarios of the hypervisor-emulated devices and passthrough regions, run by
//! tests/tests/emulated.rs. Each prints `key=value` lines and powers off with 0.
//!
//! | scenario | what it does |
//! | --- | --- |
//! | `emu-blk` | writes sectors 1-2 dword by dword and sector 3 with `rep outsd`, flushes, reads them back (`rep insd` for sector 3): `emu_write_drq=`, `emu_write=`, `emu_flush=`, `emu_read=`, `emu_read_bad=`, `emu_rep=`, `emu_rep_bad=` (statuses in hex) |
//! | `emu-errors` | every register error: `err_range=`, `err_range_hi=`, `err_count0=`, `err_count_big=`, `err_data_idle=`, `data_idle_value=`, `err_data_dir=`, `err_cmd=`, `err_ro=`, `recover=`; ignored accesses: `status_write_ignored=` (the error stays), `narrow_write_ignored=`, `write_only_read=`, `narrow_read=` |
//! | `uart` | prints only through the 16550 at 0x3F8 (no console hypercall): `uart: hello from a guest without PV drivers`, `uart_scratch=`, `uart_divisor=`, `uart_lsr=` |
//! | `pt-spin` | writes `PT_READY` at offset 8 of its region, then reads offset 0x18 in a loop until the host detaches the region (the read crashes the domain); prints `pt-spin: still mapped` and exits 1 if that never happens |
//! | `pt-fill` | writes each page's guest-physical address at offset 0x10 of the page, for every page of its region in order, from ring 0 (`ring=0`, the default) or ring 3 (`ring=3`); on a host that cannot back the pages hv ends the domain; if every write lands it prints `pt_filled=<pages>` and `pt-fill: survived` and exits 1 |
//! | `pt` | passthrough region: `pt_gpa=`, `pt_size=`, `pt_prev=` (the u64 at offset 8 before this run), `pt_host=` (offset 0, written by the host), writes `mark=N` at offset 8 and a pattern, `pt_alias=`, `pt_pin=`, `pt_l2=`, `pt_ring3=` |
//!
//! The emulated block device used is the first of the device table (`emu-errors`: the
//! second, if there is one, must be read-only). Statuses are printed in hex.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_sdk::hv_abi::device::{
    DeviceEntry, EmuBlockReg, DEVF_READONLY, DEV_EMU_BLOCK, DEV_PASSTHROUGH, EMU_CMD_FLUSH,
    EMU_CMD_READ, EMU_CMD_WRITE,
};
use guest_sdk::hv_abi::mmu::{MmuUpdate, PTE_ADDR_MASK, PTE_P, PTE_U, PTE_W, UVMF_INVLPG};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::PAGE_SIZE;
use guest_sdk::user::{self, Idt};
use guest_sdk::{arch, cmdline, mmu, poweroff, println, virt_to_phys, Error};

/// The `nth` device of kind `kind` in the device table.
fn device(si: &StartInfo, kind: u16, nth: usize) -> Option<DeviceEntry> {
    if si.devices_gpa == 0 {
        return None;
    }
    (0..si.nr_devices as u64)
        .map(|i| {
            // SAFETY: the device table is identity-mapped RAM written by the
            // hypervisor; entries are plain data.
            unsafe { core::ptr::read_volatile((si.devices_gpa + i * 32) as *const DeviceEntry) }
        })
        .filter(|e| e.kind == kind)
        .nth(nth)
}

fn outl(port: u16, v: u32) {
    // SAFETY: the port belongs to the emulated block device under test.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) };
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outl`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) };
    v
}

fn outw(port: u16, v: u16) {
    // SAFETY: as for `outl`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nostack, preserves_flags)) };
}

/// The emulated block device at `base`.
#[derive(Clone, Copy)]
struct Blk(u16);

impl Blk {
    fn port(self, r: EmuBlockReg) -> u16 {
        self.0 + r as u16
    }
    fn out(self, r: EmuBlockReg, v: u32) {
        outl(self.port(r), v)
    }
    fn inp(self, r: EmuBlockReg) -> u32 {
        inl(self.port(r))
    }
    fn status(self) -> u32 {
        self.inp(EmuBlockReg::Status)
    }
    /// Starts `cmd` on `count` sectors from `sector`; returns STATUS.
    fn cmd(self, sector: u64, count: u32, cmd: u32) -> u32 {
        self.out(EmuBlockReg::SectorLo, sector as u32);
        self.out(EmuBlockReg::SectorHi, (sector >> 32) as u32);
        self.out(EmuBlockReg::Count, count);
        self.out(EmuBlockReg::Command, cmd);
        self.status()
    }
}

/// Dword `i` of the pattern written to sectors 1-2 (the host checks the image).
fn pattern(i: u32) -> u32 {
    0xB10C_0000 | i
}

/// Sector 3's buffer for `rep outsd` and the one `rep insd` fills.
#[repr(C, align(8))]
struct Sector(UnsafeCell<[u32; 128]>);
// SAFETY: single vCPU; used only by `emu_blk`.
unsafe impl Sync for Sector {}
static REP_OUT: Sector = Sector(UnsafeCell::new([0; 128]));
static REP_IN: Sector = Sector(UnsafeCell::new([0; 128]));

pub fn emu_blk(si: &StartInfo) -> ! {
    let Some(d) = device(si, DEV_EMU_BLOCK, 0) else {
        println!("emu: no emulated block device");
        poweroff(2)
    };
    let b = Blk(d.base as u16);
    let drq = b.cmd(1, 2, EMU_CMD_WRITE);
    for i in 0..256 {
        b.out(EmuBlockReg::Data, pattern(i));
    }
    let write = b.status();
    let flush = b.cmd(0, 0, EMU_CMD_FLUSH);
    let read_drq = b.cmd(1, 2, EMU_CMD_READ);
    let mut bad = 0;
    for i in 0..256 {
        if b.inp(EmuBlockReg::Data) != pattern(i) {
            bad += 1;
        }
    }
    let read = b.status();
    println!("emu_base={:#x} emu_sectors={}", d.base, d.size);
    println!("emu_write_drq={drq:#x} emu_write={write:#x} emu_flush={flush:#x}");
    println!("emu_read_drq={read_drq:#x} emu_read={read:#x} emu_read_bad={bad}");

    // Sector 3 with string I/O: one exit per `rep` (or per page of it).
    let out = REP_OUT.0.get();
    let inp = REP_IN.0.get();
    // SAFETY: static buffers used only here, on one vCPU.
    unsafe {
        for (i, w) in (*out).iter_mut().enumerate() {
            *w = 0x5EC3_0000 | i as u32;
        }
    }
    let rep_drq = b.cmd(3, 1, EMU_CMD_WRITE);
    // SAFETY: reads 128 dwords from the static buffer; DF is clear (ABI).
    unsafe {
        asm!("rep outsd", in("dx") b.port(EmuBlockReg::Data),
            inout("rsi") out as u64 => _, inout("rcx") 128u64 => _,
            options(nostack, preserves_flags, readonly));
    }
    let rep_write = b.status();
    let _ = b.cmd(3, 1, EMU_CMD_READ);
    // SAFETY: writes 128 dwords into the static buffer; DF is clear (ABI).
    unsafe {
        asm!("rep insd", in("dx") b.port(EmuBlockReg::Data),
            inout("rdi") inp as u64 => _, inout("rcx") 128u64 => _,
            options(nostack, preserves_flags));
    }
    let rep_read = b.status();
    // SAFETY: as above.
    let rep_bad = unsafe {
        (*out)
            .iter()
            .zip((*inp).iter())
            .filter(|(a, b)| a != b)
            .count()
    };
    println!(
        "emu_rep_drq={rep_drq:#x} emu_rep={rep_write:#x} emu_rep_read={rep_read:#x} emu_rep_bad={rep_bad}"
    );
    poweroff(0)
}

pub fn emu_errors(si: &StartInfo) -> ! {
    let Some(d) = device(si, DEV_EMU_BLOCK, 0) else {
        println!("emu: no emulated block device");
        poweroff(2)
    };
    let b = Blk(d.base as u16);
    let sectors = d.size;
    let range = b.cmd(sectors - 1, 2, EMU_CMD_READ);
    b.out(EmuBlockReg::SectorHi, u32::MAX);
    b.out(EmuBlockReg::Command, EMU_CMD_WRITE);
    let range_hi = b.status();
    let count0 = b.cmd(0, 0, EMU_CMD_READ);
    let count_big = b.cmd(0, 129, EMU_CMD_WRITE);
    let _ = b.cmd(0, 0, EMU_CMD_FLUSH);
    let idle_value = b.inp(EmuBlockReg::Data);
    let data_idle = b.status();
    let _ = b.cmd(0, 1, EMU_CMD_READ);
    b.out(EmuBlockReg::Data, 1);
    let data_dir = b.status();
    let cmd = b.cmd(0, 1, 7);
    // Ignored: a write to STATUS, a 16-bit write (COUNT stays 1, so the read below
    // starts), reads of write-only registers and of the wrong size (all ones).
    b.out(EmuBlockReg::Status, 0);
    let status_write = b.status();
    b.out(EmuBlockReg::Count, 1);
    outw(b.port(EmuBlockReg::Count), 0);
    b.out(EmuBlockReg::Command, EMU_CMD_READ);
    let narrow_write = b.status();
    let write_only = b.inp(EmuBlockReg::SectorLo);
    // SAFETY: a byte read of the device's STATUS port.
    let narrow = unsafe { arch::inb(b.port(EmuBlockReg::Status)) };
    let ro = match device(si, DEV_EMU_BLOCK, 1) {
        Some(r) if r.flags & DEVF_READONLY != 0 => Blk(r.base as u16).cmd(0, 1, EMU_CMD_WRITE),
        _ => 0,
    };
    // A good command after all that: the last sector reads whole.
    let _ = b.cmd(sectors - 1, 1, EMU_CMD_READ);
    for _ in 0..128 {
        let _ = b.inp(EmuBlockReg::Data);
    }
    let recover = b.status();
    println!("err_range={range:#x} err_range_hi={range_hi:#x}");
    println!("err_count0={count0:#x} err_count_big={count_big:#x}");
    println!(
        "err_data_idle={data_idle:#x} data_idle_value={idle_value:#x} err_data_dir={data_dir:#x}"
    );
    println!("err_cmd={cmd:#x} status_write_ignored={status_write:#x}");
    println!("narrow_write_ignored={narrow_write:#x} write_only_read={write_only:#x}");
    println!("narrow_read={narrow:#x} err_ro={ro:#x} recover={recover:#x}");
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// uart: output through the 16550 only.

const COM1: u16 = 0x3F8;

struct Uart;

impl Uart {
    fn out(off: u16, v: u8) {
        // SAFETY: the UART's ports.
        unsafe { arch::outb(COM1 + off, v) }
    }
    fn inp(off: u16) -> u8 {
        // SAFETY: the UART's ports.
        unsafe { arch::inb(COM1 + off) }
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // Wait for the transmitter holding register to be empty (LSR bit 5).
            let mut spins = 0u32;
            while Uart::inp(5) & 0x20 == 0 {
                spins += 1;
                if spins > 100_000 {
                    return Err(core::fmt::Error);
                }
            }
            Uart::out(0, b);
        }
        Ok(())
    }
}

pub fn uart() -> ! {
    // 8N1, divisor 1 (115200 baud), interrupts off, FIFOs on.
    Uart::out(1, 0x00);
    Uart::out(3, 0x80);
    Uart::out(0, 0x01);
    Uart::out(1, 0x00);
    let divisor = u16::from(Uart::inp(0)) | u16::from(Uart::inp(1)) << 8;
    Uart::out(3, 0x03);
    Uart::out(2, 0xC7);
    Uart::out(4, 0x0B);
    Uart::out(7, 0x5A);
    let scratch = Uart::inp(7);
    let lsr = Uart::inp(5);
    let mut u = Uart;
    let r = writeln!(u, "uart: hello from a guest without PV drivers")
        .and_then(|()| writeln!(u, "uart_scratch={scratch:#x} uart_divisor={divisor}"))
        .and_then(|()| writeln!(u, "uart_lsr={lsr:#x}"));
    poweroff(if r.is_ok() { 0 } else { 1 })
}

// ---------------------------------------------------------------------------------
// pt: a passthrough region.

/// Offset of the u64 the host writes before the run.
const HOST_OFF: u64 = 0;
/// Offset of the u64 this scenario writes (`mark=`).
const MARK_OFF: u64 = 8;
/// In every page: `PAGE_TAG | page index`.
const PAGE_TAG_OFF: u64 = 0x10;
const PAGE_TAG: u64 = 0x9A6E_0000_0000;
/// In page 1 from 0x100: 256 u64s `SEQ | j`.
const SEQ_OFF: u64 = PAGE_SIZE + 0x100;
const SEQ: u64 = 0xC0DE_0000_0000;
/// Written by ring 3 at this offset.
const RING3_OFF: u64 = 2 * PAGE_SIZE + 0x20;
const RING3_VALUE: u64 = 0x3333_0000_0003;

fn rc(r: Result<(), Error>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(Error::Errno(e)) => e.to_ret(),
        Err(Error::Unknown(v)) => v,
    }
}

fn rd(gpa: u64) -> u64 {
    // SAFETY: identity-mapped memory (RAM, region or read-only pool).
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}

fn wr(gpa: u64, v: u64) {
    // SAFETY: identity-mapped writable memory of this scenario (the region).
    unsafe { core::ptr::write_volatile(gpa as *mut u64, v) }
}

/// The L1 and L2 entry addresses that map `va` in the current tables.
fn entries_of(va: u64) -> (u64, u64) {
    let mut table = arch::read_cr3() & PTE_ADDR_MASK;
    for shift in [39u32, 30] {
        table = rd(table + ((va >> shift) & 511) * 8) & PTE_ADDR_MASK;
    }
    let l2e = table + ((va >> 21) & 511) * 8;
    let l1 = rd(l2e) & PTE_ADDR_MASK;
    (l1 + ((va >> 12) & 511) * 8, l2e)
}

static R3_ADDR: AtomicU64 = AtomicU64::new(0);
static R3_VALUE: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// Ring 3: stores R3_VALUE at R3_ADDR, then `ud2`.
    fn tg_pt_r3_write();
}

core::arch::global_asm!(
    ".pushsection .text.tg_pt, \"ax\"",
    ".global tg_pt_r3_write",
    "tg_pt_r3_write:",
    "    mov rax, [rip + {addr}]",
    "    mov rcx, [rip + {value}]",
    "    mov [rax], rcx",
    "    ud2",
    ".popsection",
    addr = sym R3_ADDR,
    value = sym R3_VALUE,
);

#[repr(C, align(16))]
struct Stack(UnsafeCell<[u8; 4096]>);
// SAFETY: each stack is used by one context only (ring 3, or exceptions).
unsafe impl Sync for Stack {}
static R3_STACK: Stack = Stack(UnsafeCell::new([0; 4096]));
static EXC_STACK: Stack = Stack(UnsafeCell::new([0; 4096]));
static IDT: Idt = Idt::new();

fn top(s: &Stack) -> u64 {
    virt_to_phys(s.0.get()) + 4096
}

pub fn pt(si: &StartInfo) -> ! {
    let Some(d) = device(si, DEV_PASSTHROUGH, 0) else {
        println!("pt: no passthrough region");
        poweroff(2)
    };
    let (base, size) = (d.base, d.size);
    let mark = cmdline::value(si.cmdline_bytes(), b"mark")
        .and_then(cmdline::parse_u64)
        .unwrap_or(1);
    let prev = rd(base + MARK_OFF);
    let host = rd(base + HOST_OFF);
    // Plain stores and loads: no exits (the host checks the exit counters).
    wr(base + MARK_OFF, mark);
    for p in 0..size / PAGE_SIZE {
        wr(base + p * PAGE_SIZE + PAGE_TAG_OFF, PAGE_TAG | p);
    }
    for j in 0..256 {
        wr(base + SEQ_OFF + j * 8, SEQ | j);
    }
    let mut seq_bad = 0;
    for j in 0..256 {
        if rd(base + SEQ_OFF + j * 8) != SEQ | j {
            seq_bad += 1;
        }
    }
    println!("pt_gpa={base:#x} pt_size={size} pt_state={}", d.state);
    println!("pt_prev={prev:#x} pt_host={host:#x} pt_seq_bad={seq_bad}");

    // The PV MMU: a region frame maps as data (aliased at a RAM page's address)...
    let x = (si.first_free_gpa + 32 * PAGE_SIZE) & !(PAGE_SIZE - 1);
    let (l1e, l2e) = entries_of(x);
    let old = rd(l1e);
    // SAFETY: page x is free RAM nobody uses; it is mapped back below.
    let map = rc(unsafe {
        mmu::update_va_mapping(x, (base + PAGE_SIZE) | PTE_P | PTE_W | PTE_U, UVMF_INVLPG)
    });
    let alias = u8::from(rd(x + 0x100) == SEQ);
    // SAFETY: restores x's own mapping.
    let unmap = rc(unsafe { mmu::update_va_mapping(x, old, UVMF_INVLPG) });
    // ... but never as a page table.
    let pin = rc(mmu::pin_table(1, base));
    // SAFETY: refused: an L2 entry may only point at a pool frame.
    let l2 = rc(unsafe {
        mmu::mmu_update(&[MmuUpdate {
            ptr: l2e,
            val: base | PTE_P | PTE_W | PTE_U,
        }])
    }
    .1);
    println!("pt_map={map} pt_alias={alias} pt_unmap={unmap} pt_pin={pin} pt_l2={l2}");

    // Ring 3 writes the region through the boot mapping (user-accessible).
    // SAFETY: the IDT and exception stack are this scenario's own.
    unsafe { user::install(&IDT, top(&EXC_STACK)) };
    R3_ADDR.store(base + RING3_OFF, Ordering::SeqCst);
    R3_VALUE.store(RING3_VALUE, Ordering::SeqCst);
    // SAFETY: the code stores one u64 at R3_ADDR (in the region) and raises #UD.
    let exit = unsafe { user::run_user(tg_pt_r3_write as *const () as u64, top(&R3_STACK)) };
    println!(
        "pt_ring3={} pt_ring3_vector={}",
        u8::from(rd(base + RING3_OFF) == RING3_VALUE),
        exit.vector
    );
    poweroff(0)
}

/// What `pt-spin` writes at offset 8 once it runs.
const PT_READY: u64 = 0x5EAD_4EAD_0000_0001;

pub fn pt_spin(si: &StartInfo) -> ! {
    let Some(d) = device(si, DEV_PASSTHROUGH, 0) else {
        println!("pt: no passthrough region");
        poweroff(2)
    };
    wr(d.base + MARK_OFF, PT_READY);
    // About 10 us per iteration in emulated ring 0: many seconds in all.
    for _ in 0..2_000_000u32 {
        let _ = rd(d.base + 0x18);
    }
    println!("pt-spin: still mapped");
    poweroff(1)
}

static R3_END: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// Ring 3: stores each page's address at offset 0x10 of the page, for every page
    /// from R3_ADDR to R3_END (exclusive), then `ud2`.
    fn tg_pt_r3_fill();
}

core::arch::global_asm!(
    ".pushsection .text.tg_pt, \"ax\"",
    ".global tg_pt_r3_fill",
    "tg_pt_r3_fill:",
    "    mov rax, [rip + {addr}]",
    "    mov rcx, [rip + {end}]",
    "2:  cmp rax, rcx",
    "    jae 3f",
    "    mov [rax + 0x10], rax",
    "    add rax, 4096",
    "    jmp 2b",
    "3:  ud2",
    ".popsection",
    addr = sym R3_ADDR,
    end = sym R3_END,
);

pub fn pt_fill(si: &StartInfo) -> ! {
    let Some(d) = device(si, DEV_PASSTHROUGH, 0) else {
        println!("pt: no passthrough region");
        poweroff(2)
    };
    let ring = cmdline::value(si.cmdline_bytes(), b"ring")
        .and_then(cmdline::parse_u64)
        .unwrap_or(0);
    let pages = d.size / PAGE_SIZE;
    if ring == 3 {
        // SAFETY: the IDT and exception stack are this scenario's own.
        unsafe { user::install(&IDT, top(&EXC_STACK)) };
        R3_ADDR.store(d.base, Ordering::SeqCst);
        R3_END.store(d.base + d.size, Ordering::SeqCst);
        // SAFETY: the code stores one u64 in each page of the region (identity-mapped,
        // user-accessible) and raises #UD.
        let exit = unsafe { user::run_user(tg_pt_r3_fill as *const () as u64, top(&R3_STACK)) };
        println!("pt_fill_vector={}", exit.vector);
    } else {
        for p in 0..pages {
            let page = d.base + p * PAGE_SIZE;
            wr(page + PAGE_TAG_OFF, page);
        }
    }
    println!("pt_filled={pages}");
    crate::survived("pt-fill")
}
