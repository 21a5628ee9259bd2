//! A reference model of grant tables v1 (SPEC.md 8.8) for several domains: the entries
//! each guest published, the hypervisor's use counts behind `GTF_READING` /
//! `GTF_WRITING`, each domain's grant mappings (handle, window slot, the L1 entry map
//! wrote) and the bytes of a few RAM frames per domain. Written from the
//! specification, independently of hv-core, for property tests.
//!
//! The specification lists errors without an order; where several apply, the model
//! reports the first of: malformed operation (flags, reserved fields, `host_addr`,
//! `offset + len`), unknown granter (-ESRCH), reference out of range (-ENOENT), entry
//! refusing the use (-EACCES), bad frame (-EINVAL), then for map the L1 walk (-EINVAL)
//! and a present L1 entry (-EBUSY); for copy the source side before the destination.

use std::collections::BTreeMap;

use hv_abi::grant::{
    GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabUnmapGrantRef, GrantEntryV1, DOMID_SELF,
    GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF, GNTMAP_APPLICATION_MAP, GNTMAP_DEVICE_MAP,
    GNTMAP_HOST_MAP, GNTMAP_READONLY, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING,
};
use hv_abi::mmu::{PTE_A, PTE_D, PTE_P, PTE_U, PTE_W};

/// Operation not permitted.
pub const EPERM: i64 = -1;
/// Reference out of range.
pub const ENOENT: i64 = -2;
/// Unknown domain.
pub const ESRCH: i64 = -3;
/// Entry refuses the use.
pub const EACCES: i64 = -13;
/// L1 entry present.
pub const EBUSY: i64 = -16;
/// Invalid argument.
pub const EINVAL: i64 = -22;
/// Grant references per domain (4 frames of 512 entries).
pub const NR_REFS: u64 = 2048;
/// Bytes in a page.
pub const PAGE: u64 = 4096;

/// What a domain's guest published in one entry (the granter-owned bits of `flags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// `GTF_PERMIT_ACCESS` / `GTF_READONLY` bits (0 after a revoke).
    pub flags: u16,
    /// The domain allowed to use it.
    pub domid: u16,
    /// The granted frame.
    pub frame: u32,
}

/// One grant mapping held by a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The granter.
    pub granter: u32,
    /// The reference mapped.
    pub gref: u32,
    /// Writable.
    pub write: bool,
    /// The window slot's guest-physical address (`dev_bus_addr`).
    pub slot: u64,
    /// The L1 entry map wrote.
    pub pte: u64,
    /// The granter died: the slot reads as zero until the mapper unmaps.
    pub revoked: bool,
}

/// One domain in the model.
#[derive(Clone, Debug, Default)]
pub struct Dom {
    /// Alive (dead domains are unreachable).
    pub alive: bool,
    /// Published entries by reference (absent = zero).
    pub entries: BTreeMap<u32, Published>,
    /// Uses of its entries by the hypervisor: (read-only uses, writable uses).
    pub uses: BTreeMap<u32, (u32, u32)>,
    /// Its mappings, by handle.
    pub handles: BTreeMap<u32, Mapping>,
    /// L1 entries of the window range (page-aligned VA -> entry; absent = 0).
    pub l1: BTreeMap<u64, u64>,
    /// Window slots that held a mapping at some time (they read as zero when free).
    pub slots_seen: Vec<u64>,
}

/// A successful map's effect, before the hypervisor's handle and slot are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapPlan {
    granter: u32,
    gref: u32,
    write: bool,
    user: bool,
    va: u64,
}

/// Several domains with the same memory layout.
#[derive(Clone, Debug)]
pub struct Model {
    /// Domains by id.
    pub doms: BTreeMap<u32, Dom>,
    /// RAM frames of each domain.
    pub ram_frames: u64,
    /// The grant window's guest-physical address (identity-covered by L1 tables).
    pub window_gpa: u64,
    /// Frames in the grant window.
    pub window_frames: u64,
    /// Bytes of the RAM frames the model follows, by (domain, frame).
    pub mem: BTreeMap<(u32, u64), Vec<u8>>,
}

fn canonical(va: u64) -> bool {
    (va as i64) << 16 >> 16 == va as i64
}

impl Model {
    /// A model of domains with `ram_frames` frames of RAM and a window of
    /// `window_frames` frames at `window_gpa`.
    pub fn new(ram_frames: u64, window_gpa: u64, window_frames: u64) -> Model {
        Model {
            doms: BTreeMap::new(),
            ram_frames,
            window_gpa,
            window_frames,
            mem: BTreeMap::new(),
        }
    }

    /// Adds a live domain whose `frames` (each with its initial bytes) the model follows.
    pub fn add(&mut self, id: u32, frames: Vec<(u64, Vec<u8>)>) {
        self.doms.insert(
            id,
            Dom {
                alive: true,
                ..Dom::default()
            },
        );
        for (f, bytes) in frames {
            assert_eq!(bytes.len() as u64, PAGE);
            self.mem.insert((id, f), bytes);
        }
    }

    /// True if domain `id` is alive.
    pub fn alive(&self, id: u32) -> bool {
        self.doms.get(&id).is_some_and(|d| d.alive)
    }

    fn dom(&mut self, id: u32) -> &mut Dom {
        self.doms.get_mut(&id).expect("known domain")
    }

    /// The domain named `id` by `me`: itself for `DOMID_SELF` or its own id, else a live
    /// domain, else -ESRCH.
    fn resolve(&self, me: u32, id: u16) -> Result<u32, i64> {
        let id = if id == DOMID_SELF { me } else { u32::from(id) };
        if self.alive(id) {
            Ok(id)
        } else {
            Err(ESRCH)
        }
    }

    /// The entry the guest of `d` should see at `gref`: what it published plus the
    /// hypervisor's in-use bits.
    pub fn entry(&self, d: u32, gref: u32) -> GrantEntryV1 {
        let dom = &self.doms[&d];
        let p = dom.entries.get(&gref).copied().unwrap_or_default();
        let (r, w) = dom.uses.get(&gref).copied().unwrap_or((0, 0));
        let mut flags = p.flags;
        if r + w > 0 {
            flags |= GTF_READING;
        }
        if w > 0 {
            flags |= GTF_WRITING;
        }
        GrantEntryV1 {
            flags,
            domid: p.domid,
            frame: p.frame,
        }
    }

    /// True if the entry is in use (a well-behaved guest leaves it alone).
    pub fn in_use(&self, d: u32, gref: u32) -> bool {
        self.entry(d, gref).flags & (GTF_READING | GTF_WRITING) != 0
    }

    /// The guest of `d` publishes entry `gref` (only when it is not in use).
    pub fn publish(&mut self, d: u32, gref: u32, domid: u16, frame: u32, readonly: bool) {
        assert!(!self.in_use(d, gref), "a well-behaved guest");
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        self.dom(d).entries.insert(
            gref,
            Published {
                flags,
                domid,
                frame,
            },
        );
    }

    /// The guest of `d` revokes `gref` (16-bit compare-and-exchange of flags from a value
    /// without the in-use bits to 0). Returns whether it succeeded.
    pub fn revoke(&mut self, d: u32, gref: u32) -> bool {
        if self.in_use(d, gref) {
            return false;
        }
        if let Some(p) = self.dom(d).entries.get_mut(&gref) {
            p.flags = 0;
        }
        true
    }

    /// Checks that `user` may use entry `gref` of `granter` (write access if `write`)
    /// and returns its frame (the common per-operation errors).
    fn check_use(&self, granter: u32, user: u32, gref: u64, write: bool) -> Result<u64, i64> {
        if gref >= NR_REFS {
            return Err(ENOENT);
        }
        let e = self.entry(granter, gref as u32);
        if e.flags & GTF_PERMIT_ACCESS == 0 || u32::from(e.domid) != user {
            return Err(EACCES);
        }
        if write && e.flags & GTF_READONLY != 0 {
            return Err(EACCES);
        }
        let f = u64::from(e.frame);
        if f == 0 || f >= self.ram_frames {
            return Err(EINVAL);
        }
        Ok(f)
    }

    fn has_l1(&self, va: u64) -> bool {
        va >= self.window_gpa && va < self.window_gpa + self.window_frames * PAGE
    }

    /// `GNTTABOP_MAP_GRANT_REF` by `d`: the status, and on success what to record once
    /// the hypervisor's handle and slot are known ([`Model::commit_map`]).
    pub fn map(&self, d: u32, op: &GnttabMapGrantRef) -> Result<MapPlan, i64> {
        let all = GNTMAP_DEVICE_MAP | GNTMAP_HOST_MAP | GNTMAP_READONLY | GNTMAP_APPLICATION_MAP;
        if op.flags & !all != 0 || op.flags & GNTMAP_HOST_MAP == 0 {
            return Err(EINVAL);
        }
        let va = op.host_addr;
        if !canonical(va)
            || va % PAGE != 0
            || (hv_abi::layout::HV_RESERVED_VA_START..hv_abi::layout::HV_RESERVED_VA_END)
                .contains(&va)
        {
            return Err(EINVAL);
        }
        let granter = self.resolve(d, op.dom)?;
        let write = op.flags & GNTMAP_READONLY == 0;
        self.check_use(granter, d, u64::from(op.ref_), write)?;
        if !self.has_l1(va) {
            return Err(EINVAL);
        }
        if self.doms[&d].l1.get(&va).copied().unwrap_or(0) & PTE_P != 0 {
            return Err(EBUSY);
        }
        Ok(MapPlan {
            granter,
            gref: op.ref_,
            write,
            user: op.flags & GNTMAP_APPLICATION_MAP != 0,
            va,
        })
    }

    /// Records a successful map with the hypervisor's `handle` and `slot`
    /// (`dev_bus_addr`); errors if they are not a free handle and a free window slot.
    pub fn commit_map(
        &mut self,
        d: u32,
        plan: MapPlan,
        handle: u32,
        slot: u64,
    ) -> Result<(), String> {
        let window = self.window_gpa..self.window_gpa + self.window_frames * PAGE;
        if !window.contains(&slot) || slot % PAGE != 0 {
            return Err(format!("dev_bus_addr {slot:#x} is not a window slot"));
        }
        let dom = &self.doms[&d];
        if dom.handles.contains_key(&handle) {
            return Err(format!("handle {handle} is still in use"));
        }
        if let Some((h, _)) = dom.handles.iter().find(|(_, m)| m.slot == slot) {
            return Err(format!("slot {slot:#x} is still held by handle {h}"));
        }
        let mut pte = slot | PTE_P | PTE_A;
        if plan.write {
            pte |= PTE_W | PTE_D;
        }
        if plan.user {
            pte |= PTE_U;
        }
        let uses = self
            .dom(plan.granter)
            .uses
            .entry(plan.gref)
            .or_insert((0, 0));
        if plan.write {
            uses.1 += 1;
        } else {
            uses.0 += 1;
        }
        let dom = self.dom(d);
        dom.l1.insert(plan.va, pte);
        dom.handles.insert(
            handle,
            Mapping {
                granter: plan.granter,
                gref: plan.gref,
                write: plan.write,
                slot,
                pte,
                revoked: false,
            },
        );
        if !dom.slots_seen.contains(&slot) {
            dom.slots_seen.push(slot);
        }
        Ok(())
    }

    fn drop_use(&mut self, granter: u32, gref: u32, write: bool) {
        let Some(dom) = self.doms.get_mut(&granter) else {
            return;
        };
        if !dom.alive {
            return;
        }
        let Some(u) = dom.uses.get_mut(&gref) else {
            return;
        };
        if write {
            u.1 -= 1;
        } else {
            u.0 -= 1;
        }
        if *u == (0, 0) {
            dom.uses.remove(&gref);
        }
    }

    /// `GNTTABOP_UNMAP_GRANT_REF` by `d`: the status.
    pub fn unmap(&mut self, d: u32, op: &GnttabUnmapGrantRef) -> i64 {
        if op.reserved != 0 {
            return EINVAL;
        }
        let Some(m) = self.dom(d).handles.remove(&op.handle) else {
            return EINVAL;
        };
        let page = op.host_addr & !(PAGE - 1);
        if canonical(op.host_addr) && self.has_l1(page) {
            let l1 = &mut self.dom(d).l1;
            if l1.get(&page) == Some(&m.pte) {
                l1.remove(&page);
            }
        }
        if !m.revoked {
            self.drop_use(m.granter, m.gref, m.write);
        }
        0
    }

    /// One side of a copy: (domain, gpa) or an error.
    fn copy_side(
        &self,
        d: u32,
        p: &GnttabCopyPtr,
        gref: bool,
        write: bool,
    ) -> Result<(u32, u64), i64> {
        let off = u64::from(p.offset);
        if gref {
            let granter = self.resolve(d, p.domid)?;
            let f = self.check_use(granter, d, p.ref_or_gfn, write)?;
            Ok((granter, f * PAGE + off))
        } else {
            if p.domid != DOMID_SELF && u32::from(p.domid) != d {
                return Err(EPERM);
            }
            if p.ref_or_gfn >= self.ram_frames {
                return Err(EINVAL);
            }
            Ok((d, p.ref_or_gfn * PAGE + off))
        }
    }

    /// One `GNTTABOP_COPY` operation by `d`: the status (the bytes are copied in the
    /// model's memory on success).
    pub fn copy(&mut self, d: u32, op: &GnttabCopy) -> i64 {
        let r = (|| {
            if op.flags & !(GNTCOPY_SOURCE_GREF | GNTCOPY_DEST_GREF) != 0
                || op.reserved != 0
                || op.source.reserved != 0
                || op.dest.reserved != 0
            {
                return Err(EINVAL);
            }
            let len = u64::from(op.len);
            if u64::from(op.source.offset) + len > PAGE || u64::from(op.dest.offset) + len > PAGE {
                return Err(EINVAL);
            }
            let src = self.copy_side(d, &op.source, op.flags & GNTCOPY_SOURCE_GREF != 0, false)?;
            let dst = self.copy_side(d, &op.dest, op.flags & GNTCOPY_DEST_GREF != 0, true)?;
            Ok((src, dst))
        })();
        match r {
            Ok((src, dst)) => {
                let len = usize::from(op.len);
                if len > 0 {
                    let bytes = self.read(src.0, src.1, len);
                    self.write(dst.0, dst.1, &bytes);
                }
                0
            }
            Err(e) => e,
        }
    }

    /// Bytes of domain `d` at `gpa` (within one followed frame).
    pub fn read(&self, d: u32, gpa: u64, len: usize) -> Vec<u8> {
        let page = self
            .mem
            .get(&(d, gpa / PAGE))
            .unwrap_or_else(|| panic!("the model does not follow frame {:#x} of {d}", gpa / PAGE));
        let off = (gpa % PAGE) as usize;
        page[off..off + len].to_vec()
    }

    /// Writes bytes of domain `d` at `gpa` (within one followed frame).
    pub fn write(&mut self, d: u32, gpa: u64, bytes: &[u8]) {
        let page = self
            .mem
            .get_mut(&(d, gpa / PAGE))
            .unwrap_or_else(|| panic!("the model does not follow frame {:#x} of {d}", gpa / PAGE));
        let off = (gpa % PAGE) as usize;
        page[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// The frame of a live (not revoked) mapping.
    pub fn frame_of(&self, m: &Mapping) -> u64 {
        u64::from(self.doms[&m.granter].entries[&m.gref].frame)
    }

    /// Domain `d` dies (SPEC 8.8.4): its mappings are released, other domains' mappings
    /// of its grants are revoked, and it becomes unreachable.
    pub fn kill(&mut self, d: u32) {
        let mine: Vec<Mapping> = self.dom(d).handles.values().copied().collect();
        {
            let dom = self.dom(d);
            dom.alive = false;
            dom.handles.clear();
            dom.uses.clear();
        }
        for m in mine {
            if !m.revoked {
                self.drop_use(m.granter, m.gref, m.write);
            }
        }
        for (_, other) in self.doms.iter_mut() {
            for m in other.handles.values_mut() {
                if m.granter == d {
                    m.revoked = true;
                }
            }
        }
        self.mem.retain(|(id, _), _| *id != d);
    }
}
