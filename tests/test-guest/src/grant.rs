//! Grant-table scenarios (SPEC.md 8.8), run in pairs by tests/tests/grant.rs. Each
//! prints `key=value` lines (statuses as negative errnos) and powers off with 0; a
//! wait that never ends prints `timeout=<what>` and crashes.
//!
//! | scenario | role |
//! | --- | --- |
//! | `grant-a` | granter: query/setup, publishes refs 0-5 for `b`, watches the flags, revokes |
//! | `grant-b` | mapper: copies, maps, shares, ring-3 reads and writes, unmaps, dies holding ref 5 |
//! | `grant-die-a` | granter that powers off while `b` maps its ref 0 |
//! | `grant-die-b` | mapper that survives its granter and unmaps afterwards |
//!
//! Pages are free RAM after the kernel, identity-mapped. Synchronisation is through
//! the shared (granted) page and the grant flags, polled with `sched_yield`.

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use guest_sdk::hv_abi::grant::{
    GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabQuerySize, GnttabSetupTable,
    GnttabUnmapGrantRef, DOMID_SELF, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
    GNTMAP_APPLICATION_MAP, GNTMAP_HOST_MAP, GNTMAP_READONLY, GNTTABOP_COPY,
    GNTTABOP_MAP_GRANT_REF, GNTTABOP_QUERY_SIZE, GNTTABOP_SETUP_TABLE, GNTTABOP_UNMAP_GRANT_REF,
    GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING,
};
use guest_sdk::hv_abi::mmu::{PTE_ADDR_MASK, PTE_P};
use guest_sdk::hv_abi::start_info::StartInfo;
use guest_sdk::hv_abi::{Op, PAGE_SIZE};
use guest_sdk::hypercall::hypercall3;
use guest_sdk::user::{self, Idt};
use guest_sdk::{arch, cmdline, poweroff, println, virt_to_phys, Features};

const MAGIC_P: u64 = 0x5041_4745_0000_0050;
const MAGIC_R: u64 = 0x5245_4144_0000_0052;
const MAGIC_Q: u64 = 0x4845_4c44_0000_0051;
const MAGIC_S: u64 = 0x5345_4c46_0000_0053;
const DONE: u64 = 0xD0E5_D0E5;
const B_WRITE: u64 = 0xB0B0;
const A_WRITE: u64 = 0xA11CE;
const IN_USE: u16 = GTF_READING | GTF_WRITING;
const NOBODY: u16 = 999;

/// `grant_table_op(cmd, ops, ops.len())`.
fn gnttab<T>(cmd: u64, ops: &mut [T]) -> i64 {
    // SAFETY: the operations are this kernel's own buffers; what the hypervisor
    // writes back (statuses, handles, frame lists) lands in them or in pages named
    // by them, all owned by the scenario.
    unsafe {
        hypercall3(
            Op::GrantTableOp,
            cmd,
            virt_to_phys(ops.as_mut_ptr()),
            ops.len() as u64,
        )
    }
}

/// `grant_table_op` with a raw array address and count (for refusals).
fn gnttab_raw(cmd: u64, gpa: u64, count: u64) -> i64 {
    // SAFETY: the calls made through this are refused before anything is read.
    unsafe { hypercall3(Op::GrantTableOp, cmd, gpa, count) }
}

/// Free page `i` after the kernel image.
fn page(si: &StartInfo, i: u64) -> u64 {
    ((si.first_free_gpa + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)) + (64 + i) * PAGE_SIZE
}

fn word(addr: u64) -> &'static AtomicU64 {
    // SAFETY: every address used is 8-aligned, mapped (RAM, or a grant mapping that is
    // in place while it is used) and only accessed atomically by this kernel.
    unsafe { &*(addr as *const AtomicU64) }
}

fn rd(addr: u64) -> u64 {
    word(addr).load(Ordering::SeqCst)
}

fn wr(addr: u64, v: u64) {
    word(addr).store(v, Ordering::SeqCst)
}

/// The grant entry `gref` of this domain's table: (flags, domid, frame).
fn entry(
    si: &StartInfo,
    gref: u32,
) -> (&'static AtomicU16, &'static AtomicU16, &'static AtomicU32) {
    let at = si.grant_table_gpa + u64::from(gref) * 8;
    // SAFETY: the grant table is RAM of this domain, identity-mapped; entries are
    // 8-aligned and shared with the hypervisor only through atomics.
    unsafe {
        (
            &*(at as *const AtomicU16),
            &*((at + 2) as *const AtomicU16),
            &*((at + 4) as *const AtomicU32),
        )
    }
}

fn publish(si: &StartInfo, gref: u32, domid: u16, gpa: u64, flags: u16) {
    let (f, d, fr) = entry(si, gref);
    fr.store((gpa / PAGE_SIZE) as u32, Ordering::Relaxed);
    d.store(domid, Ordering::Relaxed);
    fence(Ordering::Release);
    f.store(flags, Ordering::Release);
}

fn flags(si: &StartInfo, gref: u32) -> u16 {
    entry(si, gref).0.load(Ordering::Acquire)
}

/// Revokes: flags -> 0 unless the grant is in use. True on success.
fn revoke(si: &StartInfo, gref: u32) -> bool {
    let f = entry(si, gref).0;
    let cur = f.load(Ordering::Acquire);
    cur & IN_USE == 0
        && f.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
}

/// Waits (yielding) until `cond` holds; crashes after a long while.
fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let mut tries: u32 = 0;
    while !cond() {
        tries += 1;
        if tries > 5_000_000 {
            println!("timeout={what}");
            guest_sdk::crash()
        }
        let _ = guest_sdk::sched_yield();
    }
}

fn peer(si: &StartInfo, name: &[u8]) -> u16 {
    let mut key = [0u8; 16];
    key[..6].copy_from_slice(b"domid.");
    key[6..6 + name.len()].copy_from_slice(name);
    match cmdline::value(si.cmdline_bytes(), &key[..6 + name.len()]).and_then(cmdline::parse_u64) {
        Some(v) => v as u16,
        None => {
            println!("grant: no domid of the peer on the command line");
            guest_sdk::crash()
        }
    }
}

fn require_gnttab(si: &StartInfo) {
    if !Features(si.features).contains(Features::GNTTAB) || si.grant_window_gpa == 0 {
        println!("grant: no gnttab (features={:#x})", si.features);
        poweroff(2)
    }
}

// ---------------------------------------------------------------------------------
// grant-a

pub fn granter(si: &StartInfo) -> ! {
    require_gnttab(si);
    let b = peer(si, b"b");
    let (p, r, c, d, x, q) = (
        page(si, 0),
        page(si, 1),
        page(si, 2),
        page(si, 3),
        page(si, 4),
        page(si, 5),
    );
    wr(p, MAGIC_P);
    wr(r, MAGIC_R);
    for i in 0..16 {
        wr(c + i * 8, 0x0C0C_0000_0000_0000 | i);
    }
    wr(q, MAGIC_Q);
    publish(si, 0, b, p, GTF_PERMIT_ACCESS);
    publish(si, 1, b, r, GTF_PERMIT_ACCESS | GTF_READONLY);
    publish(si, 2, NOBODY, x, GTF_PERMIT_ACCESS);
    publish(si, 3, b, c, GTF_PERMIT_ACCESS | GTF_READONLY);
    publish(si, 4, b, d, GTF_PERMIT_ACCESS);
    publish(si, 5, b, q, GTF_PERMIT_ACCESS);
    // Everything is published: b may go on.
    wr(p + 8, 1);

    // Table queries (while b works).
    let mut qs = [GnttabQuerySize {
        dom: DOMID_SELF,
        ..Default::default()
    }];
    let rc = gnttab(GNTTABOP_QUERY_SIZE, &mut qs);
    println!(
        "qs_rc={rc} qs_status={} qs_nr={} qs_max={}",
        qs[0].status, qs[0].nr_frames, qs[0].max_nr_frames
    );
    let mut list = [0u64; 4];
    let lgpa = virt_to_phys(list.as_mut_ptr());
    let st = |dom: u16, nr: u32, frame_list: u64| GnttabSetupTable {
        dom,
        nr_frames: nr,
        frame_list,
        ..Default::default()
    };
    let mut sts = [
        st(DOMID_SELF, 4, lgpa),
        st(DOMID_SELF, 5, lgpa),
        st(b, 1, lgpa),
        st(NOBODY, 1, lgpa),
        st(DOMID_SELF, 1, si.nr_pages * PAGE_SIZE),
        st(DOMID_SELF, 0, lgpa),
    ];
    let rc = gnttab(GNTTABOP_SETUP_TABLE, &mut sts);
    println!(
        "st_rc={rc} st_ok={} st_frame0={:#x} st_frame3={:#x} st_too_many={} st_other={} \
         st_nobody={} st_bad_list={} st_zero={}",
        sts[0].status,
        list[0],
        list[3],
        sts[1].status,
        sts[2].status,
        sts[3].status,
        sts[4].status,
        sts[5].status
    );
    println!(
        "bad_array={} bad_cmd={} too_many_ops={} zero_ops={}",
        gnttab_raw(GNTTABOP_QUERY_SIZE, si.nr_pages * PAGE_SIZE, 1),
        gnttab_raw(99, lgpa, 1),
        gnttab_raw(GNTTABOP_COPY, lgpa, 513),
        gnttab_raw(GNTTABOP_COPY, 0, 0)
    );

    // b has mapped P, written it and made its copies.
    wait("b_stage1", || rd(p + 16) >= 1);
    println!("a_sees_b_write={:#x}", rd(p + 24));
    println!(
        "flags_mapped_rw={:#x} flags_mapped_ro={:#x} flags_copied_src={:#x} flags_copied_dst={:#x}",
        flags(si, 0),
        flags(si, 1),
        flags(si, 3),
        flags(si, 4)
    );
    println!(
        "d_copied={:#x} d_after={:#x} d_before={:#x}",
        rd(d + 96),
        rd(d + 128),
        rd(d + 88)
    );
    println!("revoke_mapped={}", u8::from(revoke(si, 0)));
    wr(p + 32, A_WRITE);
    wr(p + 8, 2);

    // b unmaps P, then R.
    wait("unmap_p", || flags(si, 0) & IN_USE == 0);
    println!(
        "revoke_unmapped={} flags_revoked={:#x}",
        u8::from(revoke(si, 0)),
        flags(si, 0)
    );
    wait("unmap_r", || flags(si, 1) & IN_USE == 0);
    println!("revoke_ro={}", u8::from(revoke(si, 1)));

    // b maps Q (ref 5), tells us through a copy into D, and dies holding it.
    wait("b_done", || rd(d) == DONE);
    println!("flags_held={:#x}", flags(si, 5));
    // Only now may b die: it waits for this word in Q, which it still maps.
    wr(q + 16, DONE);
    wait("b_death", || flags(si, 5) & IN_USE == 0);
    println!("flags_after_mapper_death={:#x}", flags(si, 5));
    println!("revoke_after_death={}", u8::from(revoke(si, 5)));
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// grant-b

fn map_op(dom: u16, gref: u32, va: u64, flags: u32) -> GnttabMapGrantRef {
    GnttabMapGrantRef {
        host_addr: va,
        flags,
        ref_: gref,
        dom,
        ..Default::default()
    }
}

/// One map: (status, handle, dev_bus_addr).
fn map(dom: u16, gref: u32, va: u64, flags: u32) -> (i16, u32, u64) {
    let mut op = [map_op(dom, gref, va, flags)];
    let rc = gnttab(GNTTABOP_MAP_GRANT_REF, &mut op);
    if rc != 0 {
        return (rc as i16, 0, 0);
    }
    (op[0].status, op[0].handle, op[0].dev_bus_addr)
}

fn unmap(handle: u32, va: u64) -> i16 {
    let mut op = [GnttabUnmapGrantRef {
        host_addr: va,
        handle,
        ..Default::default()
    }];
    let rc = gnttab(GNTTABOP_UNMAP_GRANT_REF, &mut op);
    if rc != 0 {
        return rc as i16;
    }
    op[0].status
}

/// The current L1 entry for `va` (0 if a level above is not present).
fn l1_entry(va: u64) -> u64 {
    let mut t = arch::read_cr3() & PTE_ADDR_MASK;
    for shift in [39u32, 30, 21] {
        let e = rd(t + ((va >> shift) & 511) * 8);
        if e & PTE_P == 0 {
            return 0;
        }
        t = e & PTE_ADDR_MASK;
    }
    rd(t + ((va >> 12) & 511) * 8)
}

fn gref_ptr(dom: u16, gref: u32, offset: u16) -> GnttabCopyPtr {
    GnttabCopyPtr {
        ref_or_gfn: u64::from(gref),
        domid: dom,
        offset,
        reserved: 0,
    }
}

fn local_ptr(gpa: u64, offset: u16) -> GnttabCopyPtr {
    GnttabCopyPtr {
        ref_or_gfn: gpa / PAGE_SIZE,
        domid: DOMID_SELF,
        offset,
        reserved: 0,
    }
}

fn copy(source: GnttabCopyPtr, dest: GnttabCopyPtr, len: u16, flags: u16) -> GnttabCopy {
    GnttabCopy {
        source,
        dest,
        len,
        flags,
        status: 0x7777,
        reserved: 0,
    }
}

// Ring 3: reads or writes the u64 at GNT_R3_ADDR, then reports through `ud2`.
static GNT_R3_ADDR: AtomicU64 = AtomicU64::new(0);
static GNT_R3_VALUE: AtomicU64 = AtomicU64::new(0);

extern "C" {
    fn tg_gnt_r3_read();
    fn tg_gnt_r3_write();
}

core::arch::global_asm!(
    ".pushsection .text.tg_gnt, \"ax\"",
    ".global tg_gnt_r3_read",
    "tg_gnt_r3_read:",
    "    mov rax, [rip + {addr}]",
    "    mov rax, [rax]",
    "    mov [rip + {value}], rax",
    "    ud2",
    ".global tg_gnt_r3_write",
    "tg_gnt_r3_write:",
    "    mov rax, [rip + {addr}]",
    "    mov rcx, [rip + {value}]",
    "    mov [rax], rcx",
    "    ud2",
    ".popsection",
    addr = sym GNT_R3_ADDR,
    value = sym GNT_R3_VALUE,
);

/// A 16-byte-aligned stack.
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

/// Runs `code` in ring 3 on `addr` (with `value` for a write): (vector, error, cr2,
/// value read).
fn ring3(code: unsafe extern "C" fn(), addr: u64, value: u64) -> (u64, u64, u64, u64) {
    GNT_R3_ADDR.store(addr, Ordering::SeqCst);
    GNT_R3_VALUE.store(value, Ordering::SeqCst);
    // SAFETY: the code above only touches GNT_R3_* (user-accessible kernel data in
    // this test kernel) and `addr`, then raises #UD; exceptions return here.
    let exit = unsafe { user::run_user(code as *const () as u64, top(&R3_STACK)) };
    (
        exit.vector,
        exit.error,
        exit.cr2,
        GNT_R3_VALUE.load(Ordering::SeqCst),
    )
}

pub fn mapper(si: &StartInfo) -> ! {
    require_gnttab(si);
    let a = peer(si, b"a");
    let me = si.domid as u16;
    let w = si.grant_window_gpa;
    let va = |k: u64| w + k * PAGE_SIZE;
    println!(
        "window_frames={} window_aligned={}",
        si.grant_window_frames,
        u8::from(w % (2 << 20) == 0 && w >= si.pt_pool_gpa + si.pt_pool_frames * PAGE_SIZE)
    );
    let rw_app = GNTMAP_HOST_MAP | GNTMAP_APPLICATION_MAP;
    let ro_app = rw_app | GNTMAP_READONLY;

    // Map a's ref 0 (shared page P) as soon as a has published it.
    let mut m0 = (0, 0, 0);
    wait("publish", || {
        m0 = map(a, 0, va(0), rw_app);
        m0.0 != -13
    });
    let (st0, h0, bus0) = m0;
    let p = va(0);
    println!(
        "map_status={st0} map_bus_in_window={} b_sees_magic={:#x}",
        u8::from(
            bus0 >= w
                && bus0 < w + u64::from(si.grant_window_frames) * PAGE_SIZE
                && bus0 % PAGE_SIZE == 0
        ),
        rd(p)
    );
    wait("a_published", || rd(p + 8) >= 1);

    // Copies: one batch, failures in the middle.
    let (l, l2) = (page(si, 0), page(si, 1));
    for i in 0..4 {
        wr(l + i * 8, 0xB1B1_0000 | i);
    }
    let mut ops = [
        copy(gref_ptr(a, 3, 0), local_ptr(l2, 0), 64, GNTCOPY_SOURCE_GREF),
        copy(
            gref_ptr(a, 3, 4090),
            local_ptr(l2, 0),
            16,
            GNTCOPY_SOURCE_GREF,
        ),
        copy(local_ptr(l, 0), gref_ptr(a, 4, 96), 32, GNTCOPY_DEST_GREF),
        copy(local_ptr(l, 0), gref_ptr(a, 3, 0), 8, GNTCOPY_DEST_GREF),
        copy(
            gref_ptr(a, 5000, 0),
            local_ptr(l2, 0),
            8,
            GNTCOPY_SOURCE_GREF,
        ),
        copy(
            gref_ptr(NOBODY, 0, 0),
            local_ptr(l2, 0),
            8,
            GNTCOPY_SOURCE_GREF,
        ),
        GnttabCopy {
            reserved: 1,
            ..copy(local_ptr(l, 0), local_ptr(l2, 0), 8, 0)
        },
        copy(
            GnttabCopyPtr {
                domid: a,
                ..local_ptr(l, 0)
            },
            local_ptr(l2, 0),
            8,
            0,
        ),
        copy(gref_ptr(a, 2, 0), local_ptr(l2, 0), 8, GNTCOPY_SOURCE_GREF),
        copy(local_ptr(l, 0), local_ptr(l2, 4000), 200, 0),
        copy(local_ptr(l, 8), local_ptr(l2, 1000), 8, 0),
        copy(local_ptr(l, 0), local_ptr(si.nr_pages * PAGE_SIZE, 0), 8, 0),
    ];
    let rc = gnttab(GNTTABOP_COPY, &mut ops);
    println!("copy_rc={rc}");
    for (i, op) in ops.iter().enumerate() {
        println!("copy{i}={}", op.status);
    }
    println!(
        "l2_word0={:#x} l2_word7={:#x} l2_word8={:#x} l2_self={:#x}",
        rd(l2),
        rd(l2 + 56),
        rd(l2 + 64),
        rd(l2 + 1000)
    );

    // Refused maps.
    let ram_va = page(si, 2);
    println!(
        "map_ro_as_rw={} map_other_dom={} map_bad_ref={} map_nobody={} map_no_host={} \
         map_present={} map_again={}",
        map(a, 1, va(1), rw_app).0,
        map(a, 2, va(1), rw_app).0,
        map(a, 5000, va(1), rw_app).0,
        map(NOBODY, 0, va(1), rw_app).0,
        map(a, 0, va(1), GNTMAP_APPLICATION_MAP).0,
        map(a, 0, ram_va, rw_app).0,
        map(a, 0, va(0), rw_app).0,
    );
    println!(
        "map_bad_array={} unmap_bad_handle={}",
        gnttab_raw(GNTTABOP_MAP_GRANT_REF, si.nr_pages * PAGE_SIZE, 1),
        unmap(5000, va(5))
    );
    let (st1, h1, _) = map(a, 1, va(1), ro_app);
    println!("map_ro={st1}");

    // True sharing: write for a, then read what a wrote.
    wr(p + 24, B_WRITE);
    wr(p + 16, 1);
    wait("a_stage2", || rd(p + 8) >= 2);
    println!("b_sees_a_write={:#x}", rd(p + 32));

    // Ring 3 through the mappings.
    // SAFETY: the IDT and the exception stack are this scenario's own.
    unsafe { user::install(&IDT, top(&EXC_STACK)) };
    let (v, _, _, val) = ring3(tg_gnt_r3_read, va(0), 0);
    println!("r3_read_p_vector={v} r3_read_p={val:#x}");
    let (v, _, _, val) = ring3(tg_gnt_r3_read, va(1), 0);
    println!("r3_read_r_vector={v} r3_read_r={val:#x}");
    let (v, err, cr2, _) = ring3(tg_gnt_r3_write, va(1), 0xBAD);
    println!(
        "r3_write_ro_vector={v} r3_write_ro_error={err:#x} r3_write_ro_cr2_ok={} r_unchanged={:#x}",
        u8::from(cr2 == va(1)),
        rd(va(1))
    );

    println!(
        "unmap_r={} double_unmap={}",
        unmap(h1, va(1)),
        unmap(h1, va(1))
    );
    println!(
        "unmap_p={} pte_after_unmap={:#x}",
        unmap(h0, p),
        l1_entry(p)
    );
    let (v, err, _, _) = ring3(tg_gnt_r3_read, p, 0);
    println!("r3_after_unmap_vector={v} r3_after_unmap_error={err:#x}");
    // Another grant at the same address: ring 3 must see the new frame.
    let (st3, h3, _) = map(a, 3, p, ro_app);
    let (v, _, _, val) = ring3(tg_gnt_r3_read, p, 0);
    println!("remap={st3} r3_after_remap_vector={v} r3_after_remap={val:#x}");
    println!("unmap_remap={}", unmap(h3, p));

    // A grant to itself.
    let s = page(si, 3);
    wr(s, MAGIC_S);
    publish(si, 7, me, s, GTF_PERMIT_ACCESS);
    let (sst, sh, _) = map(DOMID_SELF, 7, va(2), rw_app);
    let seen = rd(va(2));
    wr(va(2) + 8, 0x5E1F);
    println!(
        "self_map={sst} self_map_read={seen:#x} self_map_shared={:#x} self_flags={:#x}",
        rd(s + 8),
        flags(si, 7)
    );
    println!(
        "self_unmap={} self_flags_after={:#x}",
        unmap(sh, va(2)),
        flags(si, 7)
    );

    // Hold a's ref 5, tell a (copy into its ref 4), and die without unmapping.
    let (st5, _, _) = map(a, 5, va(3), rw_app);
    println!("map_held={st5} held_read={:#x}", rd(va(3)));
    wr(l + 32, DONE);
    let mut done = [copy(
        local_ptr(l, 32),
        gref_ptr(a, 4, 0),
        8,
        GNTCOPY_DEST_GREF,
    )];
    println!(
        "done_copy={} done_status={}",
        gnttab(GNTTABOP_COPY, &mut done),
        done[0].status
    );
    // Die holding the mapping once a has seen it held (else a could read the flags
    // after the cleanup).
    wait("a_saw_held", || rd(va(3) + 16) == DONE);
    poweroff(0)
}

// ---------------------------------------------------------------------------------
// grant-die-a / grant-die-b

pub fn dying_granter(si: &StartInfo) -> ! {
    require_gnttab(si);
    let b = peer(si, b"b");
    let p = page(si, 0);
    wr(p, MAGIC_P);
    publish(si, 0, b, p, GTF_PERMIT_ACCESS);
    wait("mapped", || flags(si, 0) & GTF_READING != 0);
    println!("granter dying");
    poweroff(0)
}

pub fn survivor(si: &StartInfo) -> ! {
    require_gnttab(si);
    let a = peer(si, b"a");
    let va = si.grant_window_gpa;
    let rw = GNTMAP_HOST_MAP;
    let mut m = (0, 0, 0);
    wait("publish", || {
        m = map(a, 0, va, rw);
        m.0 != -13
    });
    println!("map={} before={:#x}", m.0, rd(va));
    // A second map of an unpublished ref fails with EACCES while a lives, ESRCH once
    // it is gone.
    wait("death", || map(a, 1, va + PAGE_SIZE, rw).0 == -3);
    // The mapping shows scratch memory once the granter's grants are released.
    wait("scratch", || rd(va) == 0);
    println!("after_death_read={:#x}", rd(va));
    println!(
        "survivor_unmap={} survivor_pte={:#x}",
        unmap(m.1, va),
        l1_entry(va)
    );
    println!("survivor_double_unmap={}", unmap(m.1, va));
    println!("survivor ok");
    poweroff(0)
}
