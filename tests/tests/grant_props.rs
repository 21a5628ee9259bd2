//! Property tests: hv-core's grant tables against the reference model
//! (tests::grant_model) over random operation sequences on three domains' real
//! `Grants`, on plain memory (no KVM needed: no VM, no vCPUs). Each domain has the
//! memory, boot page tables and PV MMU that `Domain::create_in` gives it
//! (`hv_core::domain::boot_page_tables`, the test guest loaded, start_info written),
//! so maps and unmaps go through the real MMU and the real grant window. Each
//! operation is what a guest would do: entries are published and revoked with stores
//! into the guest's table, map/unmap/copy structures are written into the caller's RAM
//! and handed to `grant_table_op` with the boot page tables as CR3, and statuses are
//! read back from RAM. After every operation the statuses and everything observable
//! must agree with the model: every grant entry of refs 0..8 (with
//! GTF_READING/GTF_WRITING), the L1 entries of the window VAs, the followed RAM frames
//! (copies), true sharing through every live mapping (both directions for writable
//! ones) and zero in revoked or freed window slots.
//!
//! And a state round trip: `Grants::from_state` refuses exactly the states that name
//! another domain (the model says which); once every mapping of another domain's grant
//! is unmapped (as before a save: connected domains cannot be restored alone), grants
//! rebuilt from `state()` (through JSON) over a copy of each domain's memory and MMU
//! give the same results as the originals for every later operation. Hostile states
//! are refused with precise errors.

// Narrowing casts of test-side values: converted with the grant-table rewrite.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hv_abi::grant::{
    GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabUnmapGrantRef, GrantEntryV1, DOMID_SELF,
    GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF, GNTMAP_APPLICATION_MAP, GNTMAP_DEVICE_MAP,
    GNTMAP_HOST_MAP, GNTMAP_READONLY, GNTTABOP_COPY, GNTTABOP_MAP_GRANT_REF,
    GNTTABOP_UNMAP_GRANT_REF, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING,
};
use hv_abi::layout::{GRANT_TABLE_GPA, START_INFO_GPA};
use hv_abi::mmu::{PTE_ADDR_MASK, PTE_P};
use hv_abi::start_info::StartInfo;
use hv_core::boot::{self, StartInfoParams};
use hv_core::domain::{boot_page_tables, DEFAULT_POOL_EXTRA_FRAMES};
use hv_core::grant::{GrantError, GrantState, Granters, Grants, SavedActive, SavedMapping};
use hv_core::memory::DomainMemory;
use hv_core::mmu::{Mmu, PoolAccess, PtMemory};
use hv_core::{KernelImage, FEATURES};
use proptest::prelude::*;
use tests::grant_model::{Model, PAGE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const DOMS: u32 = 3;
const MEM_BYTES: u64 = 4 << 20;
const RAM_FRAMES: u64 = MEM_BYTES / PAGE;
/// RAM frames the operations grant and copy between (nothing else uses them: the
/// domains never run).
const DATA: [u64; 4] = [0x200, 0x201, 0x202, 0x203];
/// Where operation structures are written in the caller's RAM.
const OPS_GPA: u64 = 0x300 * PAGE;
/// Window VAs the maps use (the boot tables have L1 tables for the whole window).
const VAS: u64 = 5;
/// A VA with no L1 table on the boot tables (checked at set-up).
const NO_L1_VA: u64 = 0x0000_4000_0000_0000;
/// The guest's physical address width given to the MMU (hv takes the host's from
/// KVM's CPUID; a common value: every address here is far below it).
const PHYS_BITS: u32 = 46;

#[derive(Clone, Copy, Debug)]
enum Va {
    /// The first window VA whose L1 entry is not present (else window VA 0).
    Free,
    /// Window VA k (maybe in use).
    Window(u64),
    Unaligned,
    NoL1,
    HvRange,
    NonCanonical,
}

/// Which grant an operation names.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// One of the entries currently published for the caller (any live granter,
    /// itself included, named by id or `DOMID_SELF`), chosen by index; if there is
    /// none, ref 0 of domain 1.
    Published(usize),
    /// Any granter id and reference.
    Raw(u16, u32),
}

#[derive(Clone, Copy, Debug)]
enum HandlePick {
    /// One of the handles map returned to the domain (maybe unmapped since).
    Issued(usize),
    /// One of the domain's current mappings (in the model), by index.
    Live(usize),
    Raw(u32),
}

#[derive(Clone, Copy, Debug)]
enum UnmapVa {
    /// The VA the handle was mapped at.
    Own,
    Window(u64),
    NoL1,
}

#[derive(Clone, Copy, Debug)]
enum LocalDom {
    SelfId,
    Own,
    Other(u16),
}

#[derive(Clone, Copy, Debug)]
enum Side {
    /// Raw granter and reference.
    Gref(u16, u64),
    /// A grant published for the caller (see [`Target::Published`]).
    Published(usize),
    Local(LocalDom, u64),
}

#[derive(Clone, Copy, Debug)]
enum Bad {
    None,
    Flags,
    Reserved,
    SideReserved,
}

#[derive(Clone, Copy, Debug)]
struct CopySpec {
    src: Side,
    dst: Side,
    src_off: u16,
    dst_off: u16,
    len: u16,
    bad: Bad,
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        d: u32,
        gref: u32,
        to: u16,
        frame: u32,
        readonly: bool,
    },
    Revoke(u32, u32),
    Map {
        d: u32,
        target: Target,
        flags: u32,
        /// Set GNTMAP_READONLY iff the entry is GTF_READONLY (most maps succeed).
        match_ro: bool,
        va: Va,
    },
    Unmap {
        d: u32,
        handle: HandlePick,
        va: UnmapVa,
        reserved: bool,
    },
    Copy(u32, Vec<CopySpec>),
    Kill(u32),
}

fn dom() -> impl Strategy<Value = u32> {
    1..=DOMS
}

fn domid() -> impl Strategy<Value = u16> {
    prop_oneof![6 => 1..=DOMS as u16, 1 => Just(DOMID_SELF), 1 => Just(77u16)]
}

fn gref() -> impl Strategy<Value = u32> {
    prop_oneof![12 => 0..=8u32, 1 => Just(2047u32), 1 => Just(2048u32), 1 => Just(5000u32)]
}

fn frame() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => prop::sample::select(DATA.to_vec()).prop_map(|f| f as u32),
        1 => Just(0u32),
        1 => Just(RAM_FRAMES as u32),
        1 => Just(u32::MAX),
    ]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => any::<usize>().prop_map(Target::Published),
        1 => (domid(), gref()).prop_map(|(d, r)| Target::Raw(d, r)),
    ]
}

fn map_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(ro, app, dev)| {
            GNTMAP_HOST_MAP
                | if ro { GNTMAP_READONLY } else { 0 }
                | if app { GNTMAP_APPLICATION_MAP } else { 0 }
                | if dev { GNTMAP_DEVICE_MAP } else { 0 }
        }),
        1 => Just(GNTMAP_READONLY),
        1 => Just(GNTMAP_HOST_MAP | 0x10),
    ]
}

fn va() -> impl Strategy<Value = Va> {
    prop_oneof![
        10 => Just(Va::Free),
        4 => (0..VAS).prop_map(Va::Window),
        1 => Just(Va::Unaligned),
        1 => Just(Va::NoL1),
        1 => Just(Va::HvRange),
        1 => Just(Va::NonCanonical),
    ]
}

fn handle() -> impl Strategy<Value = HandlePick> {
    prop_oneof![
        8 => any::<usize>().prop_map(HandlePick::Live),
        3 => any::<usize>().prop_map(HandlePick::Issued),
        2 => prop::sample::select(vec![0u32, 1, 2, 3, 1023, 1024, u32::MAX]).prop_map(HandlePick::Raw),
    ]
}

fn unmap_va() -> impl Strategy<Value = UnmapVa> {
    prop_oneof![
        8 => Just(UnmapVa::Own),
        1 => (0..VAS).prop_map(UnmapVa::Window),
        1 => Just(UnmapVa::NoL1),
    ]
}

fn side() -> impl Strategy<Value = Side> {
    let gref = prop_oneof![
        12 => 0..=8u64,
        1 => Just(2048u64),
        1 => Just(5000u64),
        1 => Just(1u64 << 32),
    ];
    let local = prop_oneof![
        4 => Just(LocalDom::SelfId),
        2 => Just(LocalDom::Own),
        1 => prop_oneof![(1..=DOMS as u16), Just(77u16)].prop_map(LocalDom::Other),
    ];
    let gfn = prop_oneof![
        8 => prop::sample::select(DATA.to_vec()),
        1 => Just(RAM_FRAMES),
        1 => Just(u64::MAX),
    ];
    prop_oneof![
        3 => any::<usize>().prop_map(Side::Published),
        2 => (domid(), gref).prop_map(|(d, r)| Side::Gref(d, r)),
        2 => (local, gfn).prop_map(|(l, f)| Side::Local(l, f)),
    ]
}

fn offset() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => prop::sample::select(vec![0u16, 8, 100, 1000]),
        2 => prop::sample::select(vec![1u16, 2048, 4000, 4095, 4096]),
    ]
}

fn len() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => prop::sample::select(vec![1u16, 8, 64, 96, 333]),
        2 => prop::sample::select(vec![0u16, 2048, 3000, 4096]),
    ]
}

fn copy_spec() -> impl Strategy<Value = CopySpec> {
    let bad = prop_oneof![
        20 => Just(Bad::None),
        1 => Just(Bad::Flags),
        1 => Just(Bad::Reserved),
        1 => Just(Bad::SideReserved),
    ];
    (side(), side(), offset(), offset(), len(), bad).prop_map(
        |(src, dst, src_off, dst_off, len, bad)| CopySpec {
            src,
            dst,
            src_off,
            dst_off,
            len,
            bad,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (dom(), 0..=8u32, domid(), frame(), any::<bool>()).prop_map(
            |(d, gref, to, frame, readonly)| Op::Grant { d, gref, to, frame, readonly }
        ),
        3 => (dom(), 0..=8u32).prop_map(|(d, r)| Op::Revoke(d, r)),
        14 => (dom(), target(), map_flags(), prop::bool::weighted(0.6), va()).prop_map(
            |(d, target, flags, match_ro, va)| Op::Map { d, target, flags, match_ro, va }
        ),
        5 => (dom(), handle(), unmap_va(), prop::bool::weighted(0.05)).prop_map(
            |(d, handle, va, reserved)| Op::Unmap { d, handle, va, reserved }
        ),
        8 => (dom(), prop::collection::vec(copy_spec(), 1..=4)).prop_map(|(d, v)| Op::Copy(d, v)),
        1 => dom().prop_map(Op::Kill),
    ]
}

/// The live domains' grants, by id (what the registry is to hv).
#[derive(Default)]
struct Live(Mutex<HashMap<u32, Arc<Grants>>>);

impl Granters for Live {
    fn grants(&self, domid: u32) -> Option<Arc<Grants>> {
        self.0.lock().expect("granters").get(&domid).cloned()
    }
}

/// What a domain is to its grants, without KVM: its memory, PV MMU and grants.
struct Dom {
    mem: DomainMemory,
    mmu: Mutex<Mmu>,
    grants: Arc<Grants>,
}

struct Real {
    live: Live,
    doms: Vec<Dom>,
    /// The boot page-table root (the same GPA in every domain).
    cr3: u64,
    window_gpa: u64,
    /// Per domain: every handle map returned, with the VA it was mapped at.
    issued: Vec<Vec<(u32, u64)>>,
    /// A counter for fresh values written through mappings.
    fresh: u64,
}

fn pattern(id: u32, frame: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (u64::from(id) * 71 + frame * 13 + i * 7 + (i >> 8)) as u8)
        .collect()
}

fn fail(msg: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(msg.to_string())
}

/// Fails with `what` and the first differing byte if the pages differ.
fn same_page(got: &[u8], want: &[u8], what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Err(fail(format!(
        "{}: byte {at} is {:#x}, the model says {:#x}",
        what(),
        got[at],
        want[at]
    )))
}

impl Real {
    fn new() -> (Real, Model) {
        let image = KernelImage::from_elf(tests::TEST_GUEST).expect("test guest");
        let (pool_frames, _) = boot::pool_frames_for(MEM_BYTES, DEFAULT_POOL_EXTRA_FRAMES);
        let live = Live::default();
        let doms: Vec<Dom> = (1..=DOMS)
            .map(|id| {
                // What `Domain::create_in` does before KVM is involved.
                let mem = DomainMemory::new(&format!("gprop{id}"), MEM_BYTES, pool_frames)
                    .expect("memory");
                let first_free = image.load_into(&mem).expect("load the test guest");
                let (bi, mmu) = boot_page_tables(&mem, &[], boot::RamMapping::Large, PHYS_BITS)
                    .expect("boot tables");
                boot::write_start_info(
                    &mem,
                    &bi,
                    &StartInfoParams {
                        domid: id,
                        nr_vcpus: 1,
                        flags: 0,
                        features: FEATURES,
                        kernel: (image.start(), image.end()),
                        first_free,
                        cmdline: "",
                    },
                )
                .expect("start_info");
                let grants = Arc::new(Grants::new(id, &mem).expect("grants"));
                live.0.lock().expect("granters").insert(id, grants.clone());
                Dom {
                    mem,
                    mmu: Mutex::new(mmu),
                    grants,
                }
            })
            .collect();
        let si: StartInfo = doms[0].mem.read_obj(START_INFO_GPA).expect("start_info");
        assert_eq!(si.nr_pages, RAM_FRAMES);
        assert_eq!(si.grant_window_gpa, doms[0].grants.window_gpa());
        let mut m = Model::new(
            RAM_FRAMES,
            si.grant_window_gpa,
            u64::from(si.grant_window_frames),
        );
        for (i, s) in doms.iter().enumerate() {
            let id = i as u32 + 1;
            assert_eq!(s.grants.domid(), id);
            let si2: StartInfo = s.mem.read_obj(START_INFO_GPA).expect("start_info");
            assert_eq!(
                (si2.pt_base_gpa, si2.grant_window_gpa),
                (si.pt_base_gpa, si.grant_window_gpa)
            );
            let mut frames = Vec::new();
            for f in DATA {
                let bytes = pattern(id, f);
                s.mem.write_ram(f * PAGE, &bytes).expect("data frame");
                frames.push((f, bytes));
            }
            m.add(id, frames);
        }
        let real = Real {
            live,
            doms,
            cr3: si.pt_base_gpa,
            window_gpa: si.grant_window_gpa,
            issued: vec![Vec::new(); DOMS as usize],
            fresh: 1,
        };
        // The set-up the VA choices rely on.
        for id in 1..=DOMS {
            assert_eq!(real.l1(id, NO_L1_VA), None, "no L1 table for NO_L1_VA");
            for k in 0..VAS {
                assert_eq!(real.l1(id, real.window_va(k)), Some(0), "window VA {k}");
            }
        }
        (real, m)
    }

    /// A copy of this world: each domain's memory and MMU copied, and its grants
    /// rebuilt from `state()` (through JSON, as a snapshot file would carry it) with
    /// `from_state` over the copied memory. Dead domains get fresh grants, destroyed at
    /// once. Every live domain's state must be restorable alone (see `disconnect`).
    fn restored(&self, model: &Model) -> Result<Real, TestCaseError> {
        let live = Live::default();
        let mut doms = Vec::new();
        for id in 1..=DOMS {
            let d = self.d(id);
            let mem = copy_memory(&d.mem, id);
            let mmu = Mutex::new(d.mmu.lock().expect("mmu").clone());
            let grants = if model.alive(id) {
                let state =
                    through_json(&d.grants.state().map_err(|e| fail(format!("state: {e}")))?);
                let g = Arc::new(
                    Grants::from_state(&state, &mem)
                        .map_err(|e| fail(format!("dom {id}: from_state: {e}")))?,
                );
                live.0.lock().expect("granters").insert(id, g.clone());
                g
            } else {
                let g = Arc::new(Grants::new(id, &mem).expect("grants"));
                g.destroy(&live);
                g
            };
            doms.push(Dom { mem, mmu, grants });
        }
        Ok(Real {
            live,
            doms,
            cr3: self.cr3,
            window_gpa: self.window_gpa,
            issued: self.issued.clone(),
            fresh: self.fresh,
        })
    }

    /// Domain `id` dies, as `DomainShared::destroy` does it: it leaves the registry,
    /// then its grants are destroyed.
    fn kill(&self, id: u32) {
        self.live.0.lock().expect("granters").remove(&id);
        self.d(id).grants.destroy(&self.live);
    }

    fn d(&self, id: u32) -> &Dom {
        &self.doms[(id - 1) as usize]
    }

    fn window_va(&self, k: u64) -> u64 {
        self.window_gpa + k * PAGE
    }

    /// The L1 entry for `va` on the boot tables, if the walk reaches an L1 table.
    fn l1(&self, id: u32, va: u64) -> Option<u64> {
        let pool = PoolAccess(&self.d(id).mem);
        let mut table = self.cr3 & PTE_ADDR_MASK;
        for shift in [39u32, 30, 21] {
            let e = pool.read_pte(table + ((va >> shift) & 511) * 8);
            if e & PTE_P == 0 {
                return None;
            }
            table = e & PTE_ADDR_MASK;
        }
        Some(pool.read_pte(table + ((va >> 12) & 511) * 8))
    }

    /// Runs `grant_table_op(cmd)` from domain `id` on `ops`, as the guest would: the
    /// array in its RAM, the outputs read back from there.
    fn call<T: FromBytes + IntoBytes + Immutable>(
        &self,
        id: u32,
        cmd: u64,
        ops: &mut [T],
    ) -> Result<(), TestCaseError> {
        let d = self.d(id);
        d.mem
            .write_ram(OPS_GPA, ops.as_bytes())
            .map_err(|e| fail(format!("write ops: {e}")))?;
        let r =
            d.grants
                .grant_table_op(&d.mmu, &self.live, self.cr3, cmd, OPS_GPA, ops.len() as u64);
        prop_assert_eq!(r, Ok(0), "grant_table_op({}) return", cmd);
        d.mem
            .read_ram(OPS_GPA, ops.as_mut_bytes())
            .map_err(|e| fail(format!("read ops: {e}")))?;
        Ok(())
    }

    /// Host pointer to window slot `slot_gpa` of domain `id`.
    fn slot_ptr(&self, id: u32, slot_gpa: u64) -> *mut u8 {
        let (base, size) = self.d(id).grants.window_host();
        let off = slot_gpa - self.window_gpa;
        assert!(off + PAGE <= size);
        (base + off) as *mut u8
    }

    fn read_slot(&self, id: u32, slot_gpa: u64) -> Vec<u8> {
        let p = self.slot_ptr(id, slot_gpa);
        let mut v = vec![0u8; PAGE as usize];
        // SAFETY: `p` is one page of domain `id`'s window reservation, which stays mapped
        // while its Grants (held by self) live; each page is always mapped readable
        // (scratch or a granted frame). Nothing else writes it concurrently (there are no
        // vCPUs).
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), v.len()) };
        v
    }

    fn write_slot_u64(&self, id: u32, slot_gpa: u64, off: u64, v: u64) {
        let p = self.slot_ptr(id, slot_gpa);
        // SAFETY: as in `read_slot`; the caller only writes slots that hold a writable
        // mapping (mapped PROT_WRITE); `off` is 8-aligned inside the page.
        unsafe { std::ptr::write_volatile(p.add(off as usize) as *mut u64, v) };
    }
}

fn apply(real: &mut Real, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let d0 = match op {
        Op::Grant { d, .. }
        | Op::Revoke(d, _)
        | Op::Map { d, .. }
        | Op::Unmap { d, .. }
        | Op::Copy(d, _)
        | Op::Kill(d) => *d,
    };
    // Ops that name a published grant or a live mapping are made by a domain that has
    // one, if any does (else most of them would fail for the same dull reason).
    let d0 = match op {
        Op::Map {
            target: Target::Published(i),
            ..
        } => caller_with_grant(model, *i).unwrap_or(d0),
        Op::Copy(_, specs) => match specs[0].src {
            Side::Published(i) => caller_with_grant(model, i).unwrap_or(d0),
            _ => d0,
        },
        Op::Unmap {
            handle: HandlePick::Live(i),
            ..
        } => {
            let owners: Vec<u32> = model
                .doms
                .iter()
                .filter(|(_, x)| x.alive && !x.handles.is_empty())
                .map(|(id, _)| *id)
                .collect();
            if owners.is_empty() {
                d0
            } else {
                owners[i % owners.len()]
            }
        }
        _ => d0,
    };
    // A dead domain makes no hypercalls.
    if !model.alive(d0) {
        return Ok(());
    }
    let mem = real.d(d0).mem.clone();
    match op {
        &Op::Grant {
            gref,
            to,
            frame,
            readonly,
            ..
        } => {
            // A well-behaved guest leaves entries in use alone.
            if model.in_use(d0, gref) {
                return Ok(());
            }
            let gpa = GRANT_TABLE_GPA + u64::from(gref) * 8;
            let flags = model_publish(model, d0, gref, to, frame, readonly);
            mem.write_obj(gpa + 2, &to).expect("entry");
            mem.write_obj(gpa + 4, &frame).expect("entry");
            mem.write_obj(gpa, &flags).expect("entry");
        }
        &Op::Revoke(_, gref) => {
            let gpa = GRANT_TABLE_GPA + u64::from(gref) * 8;
            let flags: u16 = mem.read_obj(gpa).expect("entry");
            let ok = flags & (GTF_READING | GTF_WRITING) == 0;
            if ok {
                mem.write_obj(gpa, &0u16).expect("entry");
            }
            prop_assert_eq!(ok, model.revoke(d0, gref), "revoke {} ref {}", d0, gref);
        }
        &Op::Map {
            target,
            mut flags,
            match_ro,
            va,
            ..
        } => {
            let host_addr = match va {
                Va::Free => (0..VAS)
                    .map(|k| real.window_va(k))
                    .find(|v| real.l1(d0, *v) == Some(0))
                    .unwrap_or(real.window_va(0)),
                Va::Window(k) => real.window_va(k),
                Va::Unaligned => real.window_va(1) + 8,
                Va::NoL1 => NO_L1_VA,
                Va::HvRange => hv_abi::layout::HV_RESERVED_VA_START + PAGE,
                Va::NonCanonical => 0x0000_8000_0000_0000,
            };
            let (granter, gref) = match target {
                Target::Published(i) => published_for(model, d0, i, false),
                Target::Raw(g, r) => (g, r),
            };
            if match_ro {
                let g = if granter == DOMID_SELF {
                    d0
                } else {
                    u32::from(granter)
                };
                let ro = model.alive(g) && model.entry(g, gref).flags & GTF_READONLY != 0;
                flags = if ro {
                    flags | GNTMAP_READONLY
                } else {
                    flags & !GNTMAP_READONLY
                };
            }
            let mut ops = [GnttabMapGrantRef {
                host_addr,
                flags,
                ref_: gref,
                dom: granter,
                ..Default::default()
            }];
            real.call(d0, GNTTABOP_MAP_GRANT_REF, &mut ops)?;
            let got = ops[0];
            let want = model.map(d0, &ops[0]);
            prop_assert_eq!(
                i64::from(got.status),
                want.err().unwrap_or(0),
                "map status: {:?}",
                got
            );
            if let Ok(plan) = want {
                model
                    .commit_map(d0, plan, got.handle, got.dev_bus_addr)
                    .map_err(fail)?;
                real.issued[(d0 - 1) as usize].push((got.handle, host_addr));
            }
        }
        &Op::Unmap {
            handle,
            va,
            reserved,
            ..
        } => {
            let issued = &real.issued[(d0 - 1) as usize];
            let (h, own_va) = match handle {
                HandlePick::Issued(i) if !issued.is_empty() => issued[i % issued.len()],
                HandlePick::Issued(_) => (0, real.window_va(0)),
                HandlePick::Live(i) => {
                    let live: Vec<u32> = model.doms[&d0].handles.keys().copied().collect();
                    let h = if live.is_empty() {
                        0
                    } else {
                        live[i % live.len()]
                    };
                    let va = issued
                        .iter()
                        .rev()
                        .find(|(x, _)| *x == h)
                        .map_or(real.window_va(0), |(_, v)| *v);
                    (h, va)
                }
                HandlePick::Raw(h) => (
                    h,
                    issued
                        .iter()
                        .rev()
                        .find(|(x, _)| *x == h)
                        .map_or(real.window_va(0), |(_, v)| *v),
                ),
            };
            let host_addr = match va {
                UnmapVa::Own => own_va,
                UnmapVa::Window(k) => real.window_va(k),
                UnmapVa::NoL1 => NO_L1_VA,
            };
            let mut ops = [GnttabUnmapGrantRef {
                host_addr,
                handle: h,
                reserved: u16::from(reserved),
                ..Default::default()
            }];
            real.call(d0, GNTTABOP_UNMAP_GRANT_REF, &mut ops)?;
            let want = model.unmap(d0, &ops[0]);
            prop_assert_eq!(i64::from(ops[0].status), want, "unmap status: {:?}", ops[0]);
        }
        Op::Copy(_, specs) => {
            let mut ops: Vec<GnttabCopy> = specs.iter().map(|s| copy_op(model, d0, s)).collect();
            real.call(d0, GNTTABOP_COPY, &mut ops)?;
            for (i, o) in ops.iter().enumerate() {
                let want = model.copy(d0, o);
                prop_assert_eq!(i64::from(o.status), want, "copy op {}: {:?}", i, o);
            }
        }
        Op::Kill(_) => {
            real.kill(d0);
            model.kill(d0);
        }
    }
    check(real, model)
}

fn model_publish(model: &mut Model, d: u32, gref: u32, to: u16, frame: u32, readonly: bool) -> u16 {
    model.publish(d, gref, to, frame, readonly);
    model.entry(d, gref).flags
}

/// A live domain that some live domain's published entry names (the `i`-th modulo such
/// domains), if any.
fn caller_with_grant(model: &Model, i: usize) -> Option<u32> {
    let mut users: Vec<u32> = Vec::new();
    for dom in model.doms.values().filter(|x| x.alive) {
        for e in dom.entries.values() {
            let u = u32::from(e.domid);
            if e.flags & GTF_PERMIT_ACCESS != 0 && model.alive(u) && !users.contains(&u) {
                users.push(u);
            }
        }
    }
    users.sort_unstable();
    (!users.is_empty()).then(|| users[(i / 7) % users.len()])
}

/// The `i`-th (modulo) grant currently published for `d` as (granter as `d` names it,
/// reference), mostly a writable one if `write` and there is one; ref 0 of domain 1 if
/// there is none.
fn published_for(model: &Model, d: u32, i: usize, write: bool) -> (u16, u32) {
    let mut all = Vec::new();
    for (&g, dom) in &model.doms {
        if !dom.alive {
            continue;
        }
        for (&r, e) in &dom.entries {
            if e.flags & GTF_PERMIT_ACCESS != 0 && u32::from(e.domid) == d {
                all.push((g, r, e.flags & GTF_READONLY == 0));
            }
        }
    }
    if write && i % 4 != 0 && all.iter().any(|x| x.2) {
        all.retain(|x| x.2);
    }
    if all.is_empty() {
        return (1, 0);
    }
    let (g, r, _) = all[i % all.len()];
    // Name oneself either way.
    let g = if g == d && (i / all.len()) % 2 == 1 {
        DOMID_SELF
    } else {
        g as u16
    };
    (g, r)
}

fn copy_op(model: &Model, d: u32, s: &CopySpec) -> GnttabCopy {
    let mut flags = 0;
    let mut ptr = |side: Side, off: u16, gref_flag: u16, write: bool| match side {
        Side::Published(i) => {
            flags |= gref_flag;
            let (g, r) = published_for(model, d, i, write);
            GnttabCopyPtr {
                ref_or_gfn: u64::from(r),
                domid: g,
                offset: off,
                reserved: 0,
            }
        }
        Side::Gref(dom, r) => {
            flags |= gref_flag;
            GnttabCopyPtr {
                ref_or_gfn: r,
                domid: dom,
                offset: off,
                reserved: 0,
            }
        }
        Side::Local(l, gfn) => GnttabCopyPtr {
            ref_or_gfn: gfn,
            domid: match l {
                LocalDom::SelfId => DOMID_SELF,
                LocalDom::Own => d as u16,
                LocalDom::Other(x) => x,
            },
            offset: off,
            reserved: 0,
        },
    };
    let source = ptr(s.src, s.src_off, GNTCOPY_SOURCE_GREF, false);
    let dest = ptr(s.dst, s.dst_off, GNTCOPY_DEST_GREF, true);
    let mut op = GnttabCopy {
        source,
        dest,
        len: s.len,
        flags,
        status: 0,
        reserved: 0,
    };
    match s.bad {
        Bad::None => {}
        Bad::Flags => op.flags |= 0x4,
        Bad::Reserved => op.reserved = 1,
        Bad::SideReserved => op.source.reserved = 1,
    }
    op
}

fn check(real: &mut Real, model: &mut Model) -> Result<(), TestCaseError> {
    let ids: Vec<u32> = (1..=DOMS).filter(|id| model.alive(*id)).collect();
    for &id in &ids {
        let d = real.d(id);
        // Grant entries.
        for gref in 0..=8u32 {
            let e: GrantEntryV1 = d
                .mem
                .read_obj(GRANT_TABLE_GPA + u64::from(gref) * 8)
                .expect("entry");
            prop_assert_eq!(e, model.entry(id, gref), "dom {} ref {} entry", id, gref);
        }
        // L1 entries of the window VAs.
        for k in 0..VAS {
            let va = real.window_va(k);
            let want = model.doms[&id].l1.get(&va).copied().unwrap_or(0);
            prop_assert_eq!(real.l1(id, va), Some(want), "dom {} L1 of VA {:#x}", id, va);
        }
        // Followed RAM frames.
        for f in DATA {
            let mut got = vec![0u8; PAGE as usize];
            d.mem.read_ram(f * PAGE, &mut got).expect("data frame");
            let want = model.read(id, f * PAGE, PAGE as usize);
            same_page(&got, &want, || format!("dom {id} frame {f:#x}"))?;
        }
    }
    for &id in &ids {
        let dom = model.doms[&id].clone();
        // Window slots: live mappings share the granter's frame; revoked and freed slots
        // read as zero.
        for (h, m) in &dom.handles {
            if m.revoked {
                prop_assert!(
                    real.read_slot(id, m.slot).iter().all(|b| *b == 0),
                    "dom {} handle {} (revoked) slot {:#x} is not zero",
                    id,
                    h,
                    m.slot
                );
                continue;
            }
            let frame = model.frame_of(m);
            let off = (real.fresh * 8) % PAGE;
            let v = 0x5a5a_0000_0000_0000 | real.fresh;
            real.fresh += 1;
            let gpa = frame * PAGE + off;
            real.d(m.granter)
                .mem
                .write_obj(gpa, &v)
                .expect("granted frame");
            model.write(m.granter, gpa, &v.to_le_bytes());
            let seen = real.read_slot(id, m.slot);
            same_page(
                &seen,
                &model.read(m.granter, frame * PAGE, PAGE as usize),
                || {
                    format!(
                        "dom {id} handle {h} slot {:#x}: the mapper's view of dom {} frame \
                         {frame:#x}",
                        m.slot, m.granter
                    )
                },
            )?;
            if m.write {
                let off = (real.fresh * 8) % PAGE;
                let v = 0xa5a5_0000_0000_0000 | real.fresh;
                real.fresh += 1;
                real.write_slot_u64(id, m.slot, off, v);
                model.write(m.granter, frame * PAGE + off, &v.to_le_bytes());
                let back: u64 = real
                    .d(m.granter)
                    .mem
                    .read_obj(frame * PAGE + off)
                    .expect("granted frame");
                prop_assert_eq!(
                    back,
                    v,
                    "dom {} handle {}: a write through the mapping does not reach dom {} frame {:#x}",
                    id,
                    h,
                    m.granter,
                    frame
                );
            }
        }
        for &slot in &dom.slots_seen {
            if dom.handles.values().any(|m| m.slot == slot) {
                continue;
            }
            prop_assert!(
                real.read_slot(id, slot).iter().all(|b| *b == 0),
                "dom {} free slot {:#x} is not zero",
                id,
                slot
            );
        }
    }
    Ok(())
}

/// A copy of `mem` (RAM and page-table pool) in fresh memory of the same layout.
fn copy_memory(mem: &DomainMemory, id: u32) -> DomainMemory {
    let copy = DomainMemory::new(&format!("copy{id}"), mem.ram_bytes(), mem.pool_frames())
        .expect("memory");
    let mut ram = vec![0u8; mem.ram_bytes() as usize];
    mem.read_ram(0, &mut ram).expect("read RAM");
    copy.write_ram(0, &ram).expect("write RAM");
    let mut pool = vec![0u8; (mem.pool_end() - mem.pool_gpa()) as usize];
    mem.guest_memory_read(mem.pool_gpa(), &mut pool)
        .expect("read pool");
    copy.write_any(mem.pool_gpa(), &pool).expect("write pool");
    copy
}

/// `state` after a trip through its serialised form.
fn through_json(state: &GrantState) -> GrantState {
    let text = serde_json::to_string(state).expect("serialise");
    serde_json::from_str(&text).expect("deserialise")
}

/// True if the model says domain `id`'s grant state names another domain: a live
/// mapping of another domain's grant, or another domain's live mapping of its grant.
fn connected(model: &Model, id: u32) -> bool {
    model.doms.iter().any(|(&d, dom)| {
        dom.alive
            && dom.handles.values().any(|m| {
                !m.revoked && ((d == id && m.granter != id) || (d != id && m.granter == id))
            })
    })
}

/// Every live domain unmaps every live mapping it holds of another domain's grant (at
/// the VA it was mapped at), as guests would before a save; each unmap must succeed
/// as the model says, and everything must still agree.
fn disconnect(real: &mut Real, model: &mut Model) -> Result<(), TestCaseError> {
    for d in 1..=DOMS {
        if !model.alive(d) {
            continue;
        }
        let theirs: Vec<u32> = model.doms[&d]
            .handles
            .iter()
            .filter(|(_, m)| !m.revoked && m.granter != d)
            .map(|(h, _)| *h)
            .collect();
        for h in theirs {
            let host_addr = real.issued[(d - 1) as usize]
                .iter()
                .rev()
                .find(|(x, _)| *x == h)
                .map(|(_, va)| *va)
                .ok_or_else(|| fail(format!("dom {d}: handle {h} was never issued")))?;
            let mut ops = [GnttabUnmapGrantRef {
                host_addr,
                handle: h,
                ..Default::default()
            }];
            real.call(d, GNTTABOP_UNMAP_GRANT_REF, &mut ops)?;
            let want = model.unmap(d, &ops[0]);
            prop_assert_eq!(
                want,
                0,
                "dom {} handle {}: the model refuses the unmap",
                d,
                h
            );
            prop_assert_eq!(i64::from(ops[0].status), want, "unmap status: {:?}", ops[0]);
        }
    }
    check(real, model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn grant_tables_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let (mut real, mut model) = Real::new();
        for op in &ops {
            apply(&mut real, &mut model, op)?;
        }
    }

    #[test]
    fn restored_grants_behave_as_the_originals(
        before in prop::collection::vec(op(), 10..70),
        after in prop::collection::vec(op(), 1..50),
    ) {
        let (mut real, mut model) = Real::new();
        for op in &before {
            apply(&mut real, &mut model, op)?;
        }
        // One domain's state is refused exactly when it names another domain.
        for id in (1..=DOMS).filter(|id| model.alive(*id)) {
            let d = real.d(id);
            let state = d.grants.state().map_err(|e| fail(format!("state: {e}")))?;
            let state = through_json(&state);
            let mem = copy_memory(&d.mem, id);
            match Grants::from_state(&state, &mem) {
                Ok(_) => prop_assert!(
                    !connected(&model, id),
                    "dom {}: a connected state was restored alone",
                    id
                ),
                Err(GrantError::Connected(_)) => {
                    prop_assert!(connected(&model, id), "dom {}: refused as connected", id)
                }
                Err(e) => return Err(fail(format!("dom {id}: from_state: {e}"))),
            }
        }
        // Restricted to what one domain's state can hold: no mapping across domains.
        disconnect(&mut real, &mut model)?;
        let mut copy = real.restored(&model)?;
        let mut copy_model = model.clone();
        check(&mut copy, &mut copy_model)?;
        for op in &after {
            // Both worlds are checked against the model (and so against each other).
            apply(&mut real, &mut model, op)?;
            apply(&mut copy, &mut copy_model, op)?;
        }
        for id in (1..=DOMS).filter(|id| model.alive(*id)) {
            prop_assert_eq!(
                real.d(id).grants.state().ok(),
                copy.d(id).grants.state().ok(),
                "dom {} state after the same operations",
                id
            );
        }
    }
}

/// Publishes entry `gref` of domain `d` for `to` (writable unless `readonly`).
fn publish(real: &Real, d: u32, gref: u32, to: u16, frame: u64, readonly: bool) {
    let gpa = GRANT_TABLE_GPA + u64::from(gref) * 8;
    let mem = &real.d(d).mem;
    let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
    mem.write_obj(gpa + 2, &to).expect("entry");
    mem.write_obj(gpa + 4, &(frame as u32)).expect("entry");
    mem.write_obj(gpa, &flags).expect("entry");
}

fn flags_of(mem: &DomainMemory, gref: u32) -> u16 {
    mem.read_obj(GRANT_TABLE_GPA + u64::from(gref) * 8)
        .expect("entry")
}

/// Domain 1 maps its own ref 1 (writable, at the first window VA) and lends ref 2 to a
/// back-end (a read pin). Returns the world and the handle.
fn self_mapped() -> (Real, Model, u32) {
    let (real, model) = Real::new();
    publish(&real, 1, 1, 1, DATA[0], false);
    publish(&real, 1, 2, hv_abi::device::DOMID_HV, DATA[1], true);
    let mut ops = [GnttabMapGrantRef {
        host_addr: real.window_va(0),
        flags: GNTMAP_HOST_MAP,
        ref_: 1,
        dom: DOMID_SELF,
        ..Default::default()
    }];
    real.call(1, GNTTABOP_MAP_GRANT_REF, &mut ops)
        .expect("map call");
    assert_eq!(ops[0].status, 0, "map");
    assert_eq!(
        real.d(1).grants.host_pin(2, false),
        Ok(DATA[1]),
        "back-end pin"
    );
    (real, model, ops[0].handle)
}

#[test]
fn hostile_states_are_refused() {
    let (real, _model, h) = self_mapped();
    let d = real.d(1);
    let good = d.grants.state().expect("state");
    assert_eq!((good.active.len(), good.handles.len()), (2, 1), "{good:?}");
    let mem = copy_memory(&d.mem, 1);
    assert!(Grants::from_state(&good, &mem).is_ok());
    let slot = real.window_gpa + u64::from(h) * PAGE;
    fn live(s: &mut GrantState) -> (&mut u32, &mut u32, &mut bool, &mut u64) {
        match &mut s.handles[0].mapping {
            SavedMapping::Live {
                granter,
                gref,
                write,
                pte,
            } => (granter, gref, write, pte),
            other => panic!("handle 0 is {other:?}"),
        }
    }
    fn entry(s: &mut GrantState, gref: u32) -> &mut SavedActive {
        let i = s.active.iter().position(|a| a.gref == gref).expect("ref");
        &mut s.active[i]
    }
    fn mapped(s: &mut GrantState) -> &mut SavedActive {
        entry(s, 1)
    }
    fn lent(s: &mut GrantState) -> &mut SavedActive {
        entry(s, 2)
    }
    type Edit = (&'static str, Box<dyn Fn(&mut GrantState)>);
    let edits: Vec<Edit> = vec![
        ("version 99", Box::new(|s| s.version = 99)),
        (
            "domain id 0x7ff0",
            Box::new(|s| s.domid = u32::from(DOMID_SELF)),
        ),
        ("next handle 1024", Box::new(|s| s.next_handle = 1024)),
        (
            "handle 1024 beyond",
            Box::new(|s| s.handles[0].handle = 1024),
        ),
        (
            "twice",
            Box::new(|s| {
                let x = s.handles[0];
                s.handles.push(x)
            }),
        ),
        (
            "is not one map writes",
            Box::new(move |s| *live(s).3 = (slot + PAGE) | 0x63),
        ),
        ("is not one map writes", Box::new(|s| *live(s).3 |= 1 << 63)),
        ("is not one map writes", Box::new(|s| *live(s).2 = false)),
        ("beyond the table", Box::new(|s| *live(s).1 = 2048)),
        ("maps ref 1 of domain 2", Box::new(|s| *live(s).0 = 2)),
        ("ref 2048 beyond", Box::new(|s| lent(s).gref = 2048)),
        (
            "ref 2 twice",
            Box::new(|s| {
                let x = lent(s).clone();
                s.active.push(x)
            }),
        ),
        ("is not a RAM frame", Box::new(|s| lent(s).frame = 0)),
        (
            "is not a RAM frame",
            Box::new(|s| lent(s).frame = RAM_FRAMES),
        ),
        ("without a use", Box::new(|s| lent(s).readers = 0)),
        (
            "too many uses",
            Box::new(|s| {
                lent(s).readers = u32::MAX;
                lent(s).writers = 1;
            }),
        ),
        ("in use by domain 3", Box::new(|s| lent(s).user = 3)),
        ("mapped by domain 2", Box::new(|s| mapped(s).maps[0].0 = 2)),
        (
            "in use by domain 32754 but mapped",
            Box::new(|s| {
                let m = mapped(s).maps.clone();
                lent(s).maps = m;
            }),
        ),
        ("lists handle 5", Box::new(|s| mapped(s).maps[0].1 = 5)),
        ("2 writable uses", Box::new(|s| mapped(s).writers = 2)),
        (
            "which does not list it",
            Box::new(move |s| {
                let mut x = s.handles[0];
                x.handle = 7;
                x.mapping = SavedMapping::Live {
                    granter: 1,
                    gref: 1,
                    write: false,
                    pte: (slot - u64::from(h) * PAGE + 7 * PAGE) | 0x21,
                };
                s.handles.push(x);
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut s = good.clone();
        edit(&mut s);
        match Grants::from_state(&s, &mem) {
            Ok(_) => panic!("{what}: accepted: {s:?}"),
            Err(e) => assert!(e.to_string().contains(what), "{what}: refused as: {e}"),
        }
    }
    // A destroyed domain has no state to save.
    d.grants.destroy(&real.live);
    assert_eq!(d.grants.state(), Err(hv_abi::Errno::ESRCH));
}

#[test]
fn restored_self_mappings_and_back_end_pins_work() {
    let (real, model, h) = self_mapped();
    // A memory image whose in-use flags disagree with the state is made to agree.
    let mem = &real.d(1).mem;
    for gref in [1, 2] {
        let f = flags_of(mem, gref);
        mem.write_obj(
            GRANT_TABLE_GPA + u64::from(gref) * 8,
            &(f & !(GTF_READING | GTF_WRITING)),
        )
        .expect("entry");
    }
    let copy = real.restored(&model).expect("restored");
    let cmem = &copy.d(1).mem;
    assert_eq!(
        flags_of(cmem, 1),
        GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING
    );
    assert_eq!(
        flags_of(cmem, 2),
        GTF_PERMIT_ACCESS | GTF_READONLY | GTF_READING
    );
    // The restored window slot shares the copy's frame, both ways.
    let slot = copy.window_gpa + u64::from(h) * PAGE;
    cmem.write_obj(DATA[0] * PAGE + 64, &0x1234_5678u64)
        .expect("frame");
    assert_eq!(
        copy.read_slot(1, slot)[64..72],
        0x1234_5678u64.to_le_bytes()
    );
    copy.write_slot_u64(1, slot, 128, 0xfeed);
    assert_eq!(
        cmem.read_obj::<u64>(DATA[0] * PAGE + 128).expect("frame"),
        0xfeed
    );
    // The original's frame is not the copy's.
    assert_ne!(
        mem.read_obj::<u64>(DATA[0] * PAGE + 128).expect("frame"),
        0xfeed
    );
    // The back-end's pin ends as any other.
    copy.d(1).grants.host_unpin(2, false);
    assert_eq!(flags_of(cmem, 2), GTF_PERMIT_ACCESS | GTF_READONLY);
    // The mapping unmaps as the original would: L1 entry cleared, entry free again.
    let mut ops = [GnttabUnmapGrantRef {
        host_addr: copy.window_va(0),
        handle: h,
        ..Default::default()
    }];
    copy.call(1, GNTTABOP_UNMAP_GRANT_REF, &mut ops)
        .expect("unmap call");
    assert_eq!(ops[0].status, 0, "unmap");
    assert_eq!(copy.l1(1, copy.window_va(0)), Some(0));
    assert_eq!(flags_of(cmem, 1), GTF_PERMIT_ACCESS);
    assert!(
        copy.read_slot(1, slot).iter().all(|b| *b == 0),
        "freed slot"
    );
    assert_eq!(
        copy.d(1).grants.state().expect("state"),
        GrantState {
            version: hv_core::grant::GRANT_STATE_VERSION,
            domid: 1,
            active: Vec::new(),
            handles: Vec::new(),
            next_handle: h + 1,
        }
    );
}
