//! Grant tables v1 (SPEC.md 8.8).
//!
//! Each domain's grant table lies in its own RAM at `GRANT_TABLE_GPA`; the guest writes
//! entries with plain stores and revokes them with a compare-and-exchange of `flags`.
//! The host therefore reads and updates entries only with atomics on the granter's
//! memory, and keeps its own per-entry use counts (`Active`) under the granter's
//! [`Grants`] mutex; `GTF_READING`/`GTF_WRITING` mirror those counts.
//!
//! Mapping a grant: every domain has a **grant window**, one KVM memslot of
//! `GRANT_WINDOW_FRAMES` frames after the page-table pool, whose host memory is an
//! anonymous reservation. A mapped grant is a `MAP_SHARED | MAP_FIXED` mapping of the
//! granter's memfd page over one window slot; unmapping puts a fresh anonymous page
//! back. KVM's MMU notifier drops its translations of the slot whenever the host
//! mapping changes, so the guest never keeps a stale view. The guest sees the page
//! through an L1 entry that only the hypervisor writes (guest-made entries may not map
//! the window).
//!
//! What this module owns and may call: a domain's [`Grants`] own its domain id, its
//! instance (ids are reused after a death, instances never), the host's use counts of
//! its table's entries, its mappings of grants (handles) and its grant window, and hold
//! a [`DomainMemory`] handle to the domain's memory (which keeps it mapped): the
//! domain's table entries and granted frames are read through it, and its page-table
//! pool when it maps. Other domains' grants are found through a [`Granters`] passed to
//! each operation that may name one (the registry implements it). Map and unmap write
//! the caller's L1 entries through the caller's PV MMU ([`Mmu`], passed in behind its
//! mutex, working on the pool of this domain's memory). Nothing here needs KVM: the
//! window is host memory that the domain registers as a memslot
//! ([`Grants::window_host`]).
//!
//! Locks: a domain's `Grants` state, then (optionally) its MMU. Two domains' `Grants`
//! mutexes are never held at once: a map reserves a handle (mapper), pins the entry
//! (granter), then completes the mapping (mapper).
//!
//! Saving: [`Grants::state`] gives the subsystem's own state as plain data
//! ([`GrantState`]); the table itself is guest RAM, saved with it.
//! [`Grants::from_state`] rebuilds one domain's grants alone, so it refuses a state
//! that names another domain (see there).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hv_abi::device::DOMID_HV;
use hv_abi::grant::{
    GnttabCopy, GnttabCopyPtr, GnttabMapGrantRef, GnttabQuerySize, GnttabSetupTable,
    GnttabUnmapGrantRef, DOMID_SELF, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
    GNTMAP_APPLICATION_MAP, GNTMAP_DEVICE_MAP, GNTMAP_HOST_MAP, GNTMAP_READONLY, GNTTABOP_COPY,
    GNTTABOP_MAP_GRANT_REF, GNTTABOP_QUERY_SIZE, GNTTABOP_SETUP_TABLE, GNTTABOP_UNMAP_GRANT_REF,
    GNTTAB_MAX_BATCH, GRANT_ENTRIES_PER_FRAME, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY,
    GTF_WRITING,
};
use hv_abi::layout::{self, GRANT_TABLE_FRAMES, GRANT_TABLE_GPA, GRANT_WINDOW_FRAMES};
use hv_abi::mmu::{PTE_A, PTE_ADDR_MASK, PTE_D, PTE_P, PTE_U, PTE_W};
use hv_abi::{Errno, PAGE_SIZE};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::guest_arg;
use crate::memory::DomainMemory;
use crate::mmu::hypercalls::l1_entry_for;
use crate::mmu::{Mmu, PoolAccess};

/// Grant references per domain.
pub const NR_GRANT_REFS: u32 = GRANT_TABLE_FRAMES * GRANT_ENTRIES_PER_FRAME;
/// Size of the grant window in bytes.
pub const WINDOW_BYTES: u64 = GRANT_WINDOW_FRAMES as u64 * PAGE_SIZE;
/// Attempts at the compare-and-exchange that starts using an entry before giving up
/// with EAGAIN (the guest keeps changing the entry).
const CAS_TRIES: u32 = 16;

/// Guest-physical address of the grant window for a domain whose page-table pool ends
/// at `pool_end`.
pub fn window_gpa_for(pool_end: u64) -> u64 {
    pool_end.div_ceil(layout::GRANT_WINDOW_ALIGN) * layout::GRANT_WINDOW_ALIGN
}

/// Errors setting up or restoring a domain's grant state.
#[derive(Debug, Error)]
pub enum GrantError {
    /// The window reservation could not be mapped.
    #[error("cannot reserve the grant window: {0}")]
    Reserve(#[source] std::io::Error),
    /// The domain's memory has no room for the grant table where the layout puts it.
    #[error("the domain's RAM does not hold the grant table at {0:#x}")]
    NoTable(u64),
    /// A restored mapping's frame could not be shown in its window slot.
    #[error("cannot map a granted frame into the grant window: {0}")]
    Window(#[source] std::io::Error),
    /// A saved state is malformed (hostile or from another hv).
    #[error("grant state refused: {0}")]
    BadState(String),
    /// A saved state names another domain (a mapping of its grant, or a use of this
    /// domain's grant by it): one domain's grants cannot be restored alone then.
    #[error("grant state refused: {0}; connected domains cannot be restored alone")]
    Connected(String),
}

/// Finds other live domains' grants by domain id (implemented by the registry). A
/// domain that died is not found.
pub trait Granters {
    /// The grants of live domain `domid`.
    fn grants(&self, domid: u32) -> Option<Arc<Grants>>;
}

/// Identifies one domain instance (ids can be reused after a domain died).
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A domain's grant state: its own table's entries in use, its mappings of grants and
/// its grant window.
#[derive(Debug)]
pub struct Grants {
    domid: u32,
    instance: u64,
    /// The domain's memory: its table, the frames it grants, its page-table pool.
    mem: DomainMemory,
    window_gpa: u64,
    window: Window,
    state: Mutex<State>,
}

/// Another domain's identity as recorded in grant state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DomKey {
    domid: u32,
    instance: u64,
}

#[derive(Debug)]
struct State {
    /// Set by [`Grants::destroy`]: nothing can be pinned any more.
    dead: bool,
    /// Entries of this domain's table in use by the host, by reference.
    active: HashMap<u32, Active>,
    /// This domain's mappings of grants, by handle (= window slot).
    handles: Vec<Handle>,
    /// Where the search for a free handle starts (next fit, so that a freed handle is
    /// not reused at once).
    next: usize,
}

/// One entry of this domain's table in use.
#[derive(Debug)]
struct Active {
    /// The domain using it.
    user: u16,
    /// The frame read when it was first pinned.
    frame: u64,
    /// Read-only pins (mappings and copy sources).
    readers: u32,
    /// Writable pins (mappings and copy destinations).
    writers: u32,
    /// Mappings of it: mapper and handle.
    maps: Vec<(DomKey, u32)>,
}

#[derive(Clone, Copy, Debug)]
struct Mapping {
    granter: DomKey,
    gref: u32,
    write: bool,
    /// The L1 entry value map wrote.
    pte: u64,
}

#[derive(Clone, Copy, Debug)]
enum Handle {
    Free,
    /// Reserved by a map in progress; `revoked` if the granter died meanwhile.
    Pending {
        granter: DomKey,
        revoked: bool,
    },
    /// A mapping; its window slot shows the granted frame.
    Live(Mapping),
    /// The granter died: the slot shows scratch memory until the guest unmaps. Holds
    /// the L1 entry value map wrote.
    Dead(u64),
}

/// Version of [`GrantState`]'s layout.
pub const GRANT_STATE_VERSION: u32 = 1;

/// One entry of the domain's table in use, in a [`GrantState`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedActive {
    /// The grant reference.
    pub gref: u32,
    /// The domain using it (`DOMID_HV`: one of hv's back-ends).
    pub user: u16,
    /// The frame read when it was first pinned (what every use of it sees).
    pub frame: u64,
    /// Read-only uses (mappings, back-end pins).
    pub readers: u32,
    /// Writable uses (mappings, back-end pins).
    pub writers: u32,
    /// The mappings among those uses: (mapper domain id, the mapper's handle), in
    /// order.
    pub maps: Vec<(u32, u32)>,
}

/// What a handle of a [`GrantState`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedMapping {
    /// A live mapping of reference `gref` of `granter`.
    Live {
        /// The granting domain.
        granter: u32,
        /// Its grant reference.
        gref: u32,
        /// Writable.
        write: bool,
        /// The L1 entry value map wrote.
        pte: u64,
    },
    /// The granter died; the slot shows scratch memory until the guest unmaps.
    Revoked {
        /// The L1 entry value map wrote.
        pte: u64,
    },
}

/// One allocated handle of a [`GrantState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHandle {
    /// The handle (= window slot).
    pub handle: u32,
    /// What it maps.
    pub mapping: SavedMapping,
}

/// A domain's grant state as plain data: the entries of its table in use (with their
/// counts and frames), its mappings of grants (handles) and where the next handle
/// search starts. The table itself (entries and their `GTF_READING`/`GTF_WRITING`
/// flags) is guest RAM and the L1 entries of mappings are in the page-table pool: both
/// are saved with memory, not here. Neither are the contents of revoked or free window
/// slots (scratch that only the guest reads).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantState {
    /// [`GRANT_STATE_VERSION`].
    pub version: u32,
    /// The domain id.
    pub domid: u32,
    /// Entries in use, in reference order.
    pub active: Vec<SavedActive>,
    /// Allocated handles, in handle order.
    pub handles: Vec<SavedHandle>,
    /// Where the search for a free handle starts.
    pub next_handle: u32,
}

/// The host memory behind a grant window: `frames` pages, each either a private
/// anonymous page (scratch) or a shared mapping of a granted frame.
#[derive(Debug)]
struct Window {
    base: usize,
    frames: u32,
}
fn mmap_result(p: *mut libc::c_void) -> std::io::Result<usize> {
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(p as usize)
    }
}

impl Window {
    fn new(frames: u32) -> std::io::Result<Window> {
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; it is
        // checked for failure and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                frames as usize * PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Ok(Window {
            base: mmap_result(p)?,
            frames,
        })
    }

    fn slot(&self, i: u32) -> usize {
        self.base + i as usize * PAGE_SIZE as usize
    }

    /// Shows frame `frame` of `file` (a domain's memfd: RAM at offset 0) in slot `i`.
    fn map(&self, i: u32, file: &File, frame: u64, readonly: bool) -> std::io::Result<()> {
        let prot = if readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let off = libc::off_t::try_from(frame * PAGE_SIZE).map_err(std::io::Error::other)?;
        // SAFETY: slot `i` lies inside the reservation this Window owns; MAP_FIXED only
        // replaces that one page. Nothing in the host holds references into the window.
        let p = unsafe {
            libc::mmap(
                self.slot(i) as *mut libc::c_void,
                PAGE_SIZE as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                off,
            )
        };
        mmap_result(p).map(|_| ())
    }

    /// Puts a fresh private anonymous page in slot `i`.
    fn scratch(&self, i: u32) {
        // SAFETY: as in `map`: one page of the reservation this Window owns.
        let p = unsafe {
            libc::mmap(
                self.slot(i) as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if let Err(e) = mmap_result(p) {
            tracing::error!(error = %e, slot = i, "cannot put scratch memory in a grant slot");
            // Never leave the old frame reachable: make the page inaccessible instead
            // (a guest access then fails the vCPU).
            // SAFETY: same page as above.
            unsafe {
                libc::mprotect(
                    self.slot(i) as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    libc::PROT_NONE,
                )
            };
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the reservation made in `new`, unmapped once; a VM that used it as a
        // memslot is gone (the domain holds its `Grants` and drops its VM first).
        unsafe {
            libc::munmap(
                self.base as *mut libc::c_void,
                self.frames as usize * PAGE_SIZE as usize,
            )
        };
    }
}

impl Grants {
    /// Grant state for domain `domid` over its memory `mem` (a handle is kept: the
    /// table is read in it, at [`GRANT_TABLE_GPA`], which must lie in RAM), with a
    /// fresh grant window after `mem`'s page-table pool.
    pub fn new(domid: u32, mem: &DomainMemory) -> Result<Grants, GrantError> {
        mem.check_ram(GRANT_TABLE_GPA, u64::from(NR_GRANT_REFS) * 8)
            .map_err(|_| GrantError::NoTable(GRANT_TABLE_GPA))?;
        let window = Window::new(GRANT_WINDOW_FRAMES).map_err(GrantError::Reserve)?;
        Ok(Grants {
            domid,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            mem: mem.clone(),
            window_gpa: window_gpa_for(mem.pool_end()),
            window,
            state: Mutex::new(State {
                dead: false,
                active: HashMap::new(),
                handles: vec![Handle::Free; GRANT_WINDOW_FRAMES as usize],
                next: 0,
            }),
        })
    }

    /// The domain id these grants belong to.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Guest-physical address of the grant window.
    pub fn window_gpa(&self) -> u64 {
        self.window_gpa
    }

    /// Host address of the window's memory (for its memslot), and its size in bytes.
    pub fn window_host(&self) -> (u64, u64) {
        (self.window.base as u64, WINDOW_BYTES)
    }

    /// Drops the host page-table entry of window frame `gpa`, if `gpa` is in the
    /// window, so that KVM drops its translations of it (coherence after a guest
    /// replaced a grant mapping's L1 entry itself). The slot's contents stay.
    pub fn forget_frame(&self, gpa: u64) {
        let Some(off) = gpa.checked_sub(self.window_gpa) else {
            return;
        };
        if off >= WINDOW_BYTES {
            return;
        }
        let slot = (off / PAGE_SIZE) as u32;
        // SAFETY: one page of this window's reservation; MADV_DONTNEED on a shared
        // mapping keeps the data; on scratch it only drops a private page of zeroes or
        // guest scribbles that no one needs.
        unsafe {
            libc::madvise(
                self.window.slot(slot) as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        };
    }

    fn key(&self) -> DomKey {
        DomKey {
            domid: self.domid,
            instance: self.instance,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, Errno> {
        self.state.lock().map_err(|_| Errno::EIO)
    }

    fn slot_gpa(&self, h: u32) -> u64 {
        self.window_gpa + u64::from(h) * PAGE_SIZE
    }

    /// Reserves a free handle (and window slot) for a map of `granter`'s grant.
    fn reserve(&self, granter: DomKey) -> Result<u32, Errno> {
        let mut st = self.lock()?;
        if st.dead {
            return Err(Errno::ESRCH);
        }
        let n = st.handles.len();
        let start = st.next;
        for k in 0..n {
            let i = (start + k) % n;
            if matches!(st.handles[i], Handle::Free) {
                st.handles[i] = Handle::Pending {
                    granter,
                    revoked: false,
                };
                st.next = (i + 1) % n;
                return Ok(i as u32);
            }
        }
        Err(Errno::ENOSPC)
    }

    fn free(&self, h: u32) {
        if let Ok(mut st) = self.lock() {
            if let Some(s) = st.handles.get_mut(h as usize) {
                *s = Handle::Free;
            }
        }
    }

    /// The granter `granter` died: its mapping `h` (if it is still that one) shows
    /// scratch memory from now on.
    fn revoke(&self, h: u32, granter: DomKey) {
        let Ok(mut st) = self.lock() else { return };
        let Some(slot) = st.handles.get_mut(h as usize) else {
            return;
        };
        match *slot {
            Handle::Live(m) if m.granter == granter => {
                self.window.scratch(h);
                *slot = Handle::Dead(m.pte);
            }
            Handle::Pending { granter: g, .. } if g == granter => {
                *slot = Handle::Pending {
                    granter: g,
                    revoked: true,
                };
            }
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------
    // Entries of this domain's table (this domain as the granter).

    /// The first 4 bytes (flags | domid << 16) and the frame of entry `gref` of this
    /// domain's table, as atomics on its RAM.
    fn entry(&self, gref: u32) -> Result<(&AtomicU32, &AtomicU32), Errno> {
        let gpa = GRANT_TABLE_GPA + u64::from(gref) * 8;
        // The table lies in RAM (checked in `new`; checked once more here).
        self.mem.check_ram(gpa, 8).map_err(|_| Errno::EIO)?;
        let host = self.mem.host_address(gpa).map_err(|_| Errno::EIO)? as *mut u32;
        // SAFETY: `host` is 8-aligned and points at 8 bytes of the domain's RAM mapping,
        // which `self.mem` keeps mapped as long as `self` lives; the guest changes them
        // concurrently, so the host only accesses them atomically.
        unsafe { Ok((AtomicU32::from_ptr(host), AtomicU32::from_ptr(host.add(1)))) }
    }

    /// Starts using entry `gref` of this domain's table for domain `user`; `write` for
    /// writable access; `map` records a mapping (mapper, handle). Returns the frame.
    fn pin(
        &self,
        user: u32,
        gref: u32,
        write: bool,
        map: Option<(DomKey, u32)>,
    ) -> Result<u64, Errno> {
        if gref >= NR_GRANT_REFS {
            return Err(Errno::ENOENT);
        }
        let mut st = self.lock()?;
        if st.dead {
            return Err(Errno::ESRCH);
        }
        let (word, frame_word) = self.entry(gref)?;
        let want = u32::from(GTF_READING) | if write { u32::from(GTF_WRITING) } else { 0 };
        let mut tries = 0;
        loop {
            let w = word.load(Ordering::Acquire);
            let flags = w as u16;
            let domid = (w >> 16) as u16;
            if flags & GTF_PERMIT_ACCESS == 0 || u32::from(domid) != user {
                return Err(Errno::EACCES);
            }
            if write && flags & GTF_READONLY != 0 {
                return Err(Errno::EACCES);
            }
            if w & want == want
                || word
                    .compare_exchange(w, w | want, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                break;
            }
            tries += 1;
            if tries >= CAS_TRIES {
                return Err(Errno::EAGAIN);
            }
        }
        let ram_frames = self.mem.ram_bytes() / PAGE_SIZE;
        let frame = match st.active.get(&gref) {
            Some(a) if u32::from(a.user) != user => {
                // The granter rewrote an entry in use for another domain.
                sync_flags(word, Some(a));
                return Err(Errno::EACCES);
            }
            Some(a) => a.frame,
            None => {
                let f = u64::from(frame_word.load(Ordering::Acquire));
                if f == 0 || f >= ram_frames {
                    sync_flags(word, None);
                    return Err(Errno::EINVAL);
                }
                f
            }
        };
        let act = st.active.entry(gref).or_insert(Active {
            user: user as u16,
            frame,
            readers: 0,
            writers: 0,
            maps: Vec::new(),
        });
        if write {
            act.writers += 1;
        } else {
            act.readers += 1;
        }
        if let Some(m) = map {
            act.maps.push(m);
        }
        Ok(frame)
    }

    /// Stops one use of entry `gref` of this domain's table (see [`Self::pin`]).
    fn unpin(&self, gref: u32, write: bool, map: Option<(DomKey, u32)>) {
        let Ok(mut st) = self.lock() else {
            return;
        };
        if st.dead {
            return;
        }
        let Some(act) = st.active.get_mut(&gref) else {
            return;
        };
        if write {
            act.writers = act.writers.saturating_sub(1);
        } else {
            act.readers = act.readers.saturating_sub(1);
        }
        if let Some(m) = map {
            if let Some(i) = act.maps.iter().position(|x| *x == m) {
                act.maps.swap_remove(i);
            }
        }
        let unused = act.readers + act.writers == 0;
        if let Ok((word, _)) = self.entry(gref) {
            sync_flags(word, (!unused).then_some(&*act));
        }
        if unused {
            st.active.remove(&gref);
        }
    }

    // -----------------------------------------------------------------------------
    // Grants to hv's own back-ends (DOMID_HV).

    /// Starts using entry `gref` of this domain's table for one of hv's back-ends: the
    /// entry must grant access to `DOMID_HV` (writable if `write`). Its flags show
    /// `GTF_READING` (and `GTF_WRITING` if `write`) until the matching
    /// [`host_unpin`](Self::host_unpin), so the guest cannot revoke it meanwhile.
    /// Returns the granted frame (a RAM frame of this domain).
    ///
    /// Errors: `ENOENT` (ref beyond the table), `EACCES` (not granted to `DOMID_HV`, or
    /// read-only for a write), `EINVAL` (bad frame), `EAGAIN` (the entry keeps
    /// changing), `ESRCH` (the domain is dying).
    pub fn host_pin(&self, gref: u32, write: bool) -> Result<u64, Errno> {
        self.pin(u32::from(DOMID_HV), gref, write, None)
    }

    /// Ends one use started by [`host_pin`](Self::host_pin) (same `gref` and `write`).
    pub fn host_unpin(&self, gref: u32, write: bool) {
        self.unpin(gref, write, None)
    }

    // -----------------------------------------------------------------------------
    // Other domains.

    /// This domain, or another live one named by a guest (`DOMID_SELF` is this one).
    fn lookup<'a>(&'a self, granters: &dyn Granters, domid: u16) -> Result<Peer<'a>, Errno> {
        if domid == DOMID_SELF || u32::from(domid) == self.domid {
            return Ok(Peer::Me(self));
        }
        granters
            .grants(u32::from(domid))
            .map(Peer::Other)
            .ok_or(Errno::ESRCH)
    }

    /// The live domain instance `key` (not a later one with the same id).
    fn find<'a>(&'a self, granters: &dyn Granters, key: DomKey) -> Option<Peer<'a>> {
        if key == self.key() {
            return Some(Peer::Me(self));
        }
        granters
            .grants(key.domid)
            .filter(|g| g.instance == key.instance)
            .map(Peer::Other)
    }

    /// Checks the `dom` field of setup_table / query_size.
    fn check_self(&self, granters: &dyn Granters, domid: u16) -> Result<(), Errno> {
        if domid == DOMID_SELF || u32::from(domid) == self.domid {
            Ok(())
        } else if granters.grants(u32::from(domid)).is_some() {
            Err(Errno::EPERM)
        } else {
            Err(Errno::ESRCH)
        }
    }
}

const IN_USE: u32 = (GTF_READING | GTF_WRITING) as u32;

/// Makes GTF_READING / GTF_WRITING of `word` match the counts (clears the bits not
/// backed by a use; bits are only ever set by `pin`'s compare-and-exchange and by
/// [`Grants::from_state`]).
fn sync_flags(word: &AtomicU32, act: Option<&Active>) {
    let (readers, writers) = act.map_or((0, 0), |a| (a.readers, a.writers));
    let mut keep = 0u32;
    if readers + writers > 0 {
        keep |= u32::from(GTF_READING);
    }
    if writers > 0 {
        keep |= u32::from(GTF_WRITING);
    }
    let clear = IN_USE & !keep;
    if clear != 0 {
        word.fetch_and(!clear, Ordering::AcqRel);
    }
}

/// A [`Grants::host_pin`] that ends when dropped.
#[derive(Debug)]
pub struct HostPin<'a> {
    granter: &'a Grants,
    gref: u32,
    write: bool,
    frame: u64,
}

impl<'a> HostPin<'a> {
    /// Pins `gref` of `granter` for a back-end (see [`Grants::host_pin`]).
    pub fn new(granter: &'a Grants, gref: u32, write: bool) -> Result<HostPin<'a>, Errno> {
        let frame = granter.host_pin(gref, write)?;
        Ok(HostPin {
            granter,
            gref,
            write,
            frame,
        })
    }

    /// The granted frame (guest-physical address >> 12, in the granter's RAM).
    pub fn frame(&self) -> u64 {
        self.frame
    }
}

impl Drop for HostPin<'_> {
    fn drop(&mut self) {
        self.granter.host_unpin(self.gref, self.write);
    }
}

/// The calling domain's grants or another live domain's.
enum Peer<'a> {
    Me(&'a Grants),
    Other(Arc<Grants>),
}

impl std::ops::Deref for Peer<'_> {
    type Target = Grants;
    fn deref(&self) -> &Grants {
        match self {
            Peer::Me(g) => g,
            Peer::Other(g) => g,
        }
    }
}

// ---------------------------------------------------------------------------------
// Saving and restoring.

/// True if `pte` is an L1 entry that map writes for the window slot at `slot_gpa`
/// (writable iff `write`, when that is known).
fn valid_pte(pte: u64, slot_gpa: u64, write: Option<bool>) -> bool {
    let flags = pte & !PTE_ADDR_MASK;
    let w = flags & (PTE_W | PTE_D);
    pte & PTE_ADDR_MASK == slot_gpa
        && flags & !(PTE_P | PTE_A | PTE_W | PTE_D | PTE_U) == 0
        && flags & (PTE_P | PTE_A) == PTE_P | PTE_A
        && (w == 0 || w == PTE_W | PTE_D)
        && write.is_none_or(|wr| wr == (w != 0))
}

impl Grants {
    /// This domain's grant state as plain data (see [`GrantState`]).
    ///
    /// Take it while nothing uses the grants (the vCPUs of this domain and of every
    /// domain connected to it stopped): a map in progress (a reserved handle) cannot be
    /// saved and gives `EBUSY`, and a copy in progress would be saved as a use it was
    /// about to end. `ESRCH` once the domain is destroyed.
    pub fn state(&self) -> Result<GrantState, Errno> {
        let st = self.lock()?;
        if st.dead {
            return Err(Errno::ESRCH);
        }
        let mut active: Vec<SavedActive> = st
            .active
            .iter()
            .map(|(&gref, a)| {
                let mut maps: Vec<(u32, u32)> = a.maps.iter().map(|(k, h)| (k.domid, *h)).collect();
                maps.sort_unstable();
                SavedActive {
                    gref,
                    user: a.user,
                    frame: a.frame,
                    readers: a.readers,
                    writers: a.writers,
                    maps,
                }
            })
            .collect();
        active.sort_unstable_by_key(|a| a.gref);
        let mut handles = Vec::new();
        for (h, slot) in st.handles.iter().enumerate() {
            let mapping = match *slot {
                Handle::Free => continue,
                Handle::Pending { .. } => return Err(Errno::EBUSY),
                Handle::Live(m) => SavedMapping::Live {
                    granter: m.granter.domid,
                    gref: m.gref,
                    write: m.write,
                    pte: m.pte,
                },
                Handle::Dead(pte) => SavedMapping::Revoked { pte },
            };
            handles.push(SavedHandle {
                handle: h as u32,
                mapping,
            });
        }
        Ok(GrantState {
            version: GRANT_STATE_VERSION,
            domid: self.domid,
            active,
            handles,
            next_handle: st.next as u32,
        })
    }

    /// One domain's grants rebuilt alone from `state` over its memory `mem` (restored
    /// from the same save), with a fresh window as [`new`](Self::new) and a new
    /// instance.
    ///
    /// `state` is checked as hostile input: its version, the domain id, every reference
    /// (below [`NR_GRANT_REFS`], once), every handle (below the window's
    /// `GRANT_WINDOW_FRAMES` frames, once, with an L1 entry value that map could have
    /// written for its slot), every frame (in `mem`'s RAM), the counts (not zero, no
    /// overflow) and that entries and mappings agree both ways.
    ///
    /// What is restored: the entries in use by this domain itself (its mappings of its
    /// own grants: the window slots show the frames again, through `mem`'s memfd) and
    /// by hv's back-ends (`DOMID_HV`: restored as counts, which a back-end taking the
    /// connection over ends with [`host_unpin`](Self::host_unpin); until then the guest
    /// cannot revoke those entries), and mappings whose granter had died (their slots
    /// show scratch memory until the guest unmaps). `GTF_READING`/`GTF_WRITING` of each
    /// entry in use are set to match its counts (a memory image saved with the state
    /// shows them already).
    ///
    /// What is refused ([`GrantError::Connected`]): a state naming another domain, that
    /// is a live mapping of another domain's grant or an entry in use by (mapped by)
    /// another domain. Those need both domains restored together, which this does not
    /// do; unmap such grants before saving. A state with a use of its own grant that is
    /// not a mapping (a copy in progress) is refused as malformed.
    pub fn from_state(state: &GrantState, mem: &DomainMemory) -> Result<Grants, GrantError> {
        let bad = GrantError::BadState;
        let connected = GrantError::Connected;
        if state.version != GRANT_STATE_VERSION {
            return Err(bad(format!(
                "version {} (this hv reads {GRANT_STATE_VERSION})",
                state.version
            )));
        }
        let me_id = state.domid;
        if me_id >= u32::from(DOMID_SELF) {
            return Err(bad(format!("domain id {me_id:#x} is a special id")));
        }
        if state.next_handle >= GRANT_WINDOW_FRAMES {
            return Err(bad(format!(
                "next handle {} beyond the window's {GRANT_WINDOW_FRAMES} frames",
                state.next_handle
            )));
        }
        let g = Grants::new(me_id, mem)?;
        let me = g.key();
        let ram_frames = mem.ram_bytes() / PAGE_SIZE;

        let mut handles = vec![Handle::Free; GRANT_WINDOW_FRAMES as usize];
        for s in &state.handles {
            let h = s.handle;
            let Some(slot) = handles.get_mut(h as usize) else {
                return Err(bad(format!(
                    "handle {h} beyond the window's {GRANT_WINDOW_FRAMES} frames"
                )));
            };
            if !matches!(slot, Handle::Free) {
                return Err(bad(format!("handle {h} twice")));
            }
            let slot_gpa = g.slot_gpa(h);
            let (pte, write) = match s.mapping {
                SavedMapping::Live { pte, write, .. } => (pte, Some(write)),
                SavedMapping::Revoked { pte } => (pte, None),
            };
            if !valid_pte(pte, slot_gpa, write) {
                return Err(bad(format!(
                    "handle {h}: L1 entry {pte:#x} is not one map writes for slot {slot_gpa:#x}"
                )));
            }
            *slot = match s.mapping {
                SavedMapping::Live {
                    granter,
                    gref,
                    write,
                    pte,
                } => {
                    if granter != me_id {
                        return Err(connected(format!(
                            "handle {h} maps ref {gref} of domain {granter}"
                        )));
                    }
                    if gref >= NR_GRANT_REFS {
                        return Err(bad(format!(
                            "handle {h} maps ref {gref}, beyond the table's {NR_GRANT_REFS}"
                        )));
                    }
                    Handle::Live(Mapping {
                        granter: me,
                        gref,
                        write,
                        pte,
                    })
                }
                SavedMapping::Revoked { pte } => Handle::Dead(pte),
            };
        }

        let mut active: BTreeMap<u32, Active> = BTreeMap::new();
        let mut listed = BTreeSet::new();
        for a in &state.active {
            let gref = a.gref;
            if gref >= NR_GRANT_REFS {
                return Err(bad(format!(
                    "ref {gref} beyond the table's {NR_GRANT_REFS}"
                )));
            }
            if active.contains_key(&gref) {
                return Err(bad(format!("ref {gref} twice")));
            }
            if a.frame == 0 || a.frame >= ram_frames {
                return Err(bad(format!(
                    "ref {gref}: frame {:#x} is not a RAM frame (the domain has {ram_frames})",
                    a.frame
                )));
            }
            match a.readers.checked_add(a.writers) {
                Some(0) => return Err(bad(format!("ref {gref} in use without a use"))),
                None => return Err(bad(format!("ref {gref}: too many uses"))),
                Some(_) => {}
            }
            let user = u32::from(a.user);
            if user != me_id && a.user != DOMID_HV {
                return Err(connected(format!("ref {gref} is in use by domain {user}")));
            }
            let (mut ro, mut rw) = (0u32, 0u32);
            let mut maps = Vec::with_capacity(a.maps.len());
            for &(mapper, h) in &a.maps {
                if mapper != me_id {
                    return Err(connected(format!(
                        "ref {gref} is mapped by domain {mapper}"
                    )));
                }
                if user != me_id {
                    return Err(bad(format!(
                        "ref {gref} is in use by domain {user} but mapped by domain {mapper}"
                    )));
                }
                match handles.get(h as usize) {
                    Some(Handle::Live(m)) if m.gref == gref => {
                        if m.write {
                            rw += 1;
                        } else {
                            ro += 1;
                        }
                    }
                    _ => {
                        return Err(bad(format!(
                            "ref {gref} lists handle {h}, which does not map it"
                        )))
                    }
                }
                if !listed.insert(h) {
                    return Err(bad(format!("handle {h} listed twice")));
                }
                maps.push((me, h));
            }
            // The domain's own uses of its grants at rest are its mappings (copies end
            // within their hypercall); back-ends' pins are counts only.
            if user == me_id && (a.readers, a.writers) != (ro, rw) {
                return Err(bad(format!(
                    "ref {gref}: {} read-only and {} writable uses, but {ro} read-only and \
                     {rw} writable mappings",
                    a.readers, a.writers
                )));
            }
            active.insert(
                gref,
                Active {
                    user: a.user,
                    frame: a.frame,
                    readers: a.readers,
                    writers: a.writers,
                    maps,
                },
            );
        }
        for (h, slot) in handles.iter().enumerate() {
            if let Handle::Live(m) = slot {
                if !listed.contains(&(h as u32)) {
                    return Err(bad(format!(
                        "handle {h} maps ref {}, which does not list it",
                        m.gref
                    )));
                }
            }
        }

        // Every check passed: show the frames, make the flags match the counts.
        for (h, slot) in handles.iter().enumerate() {
            if let Handle::Live(m) = slot {
                if let Some(a) = active.get(&m.gref) {
                    g.window
                        .map(h as u32, mem.memfd(), a.frame, !m.write)
                        .map_err(GrantError::Window)?;
                }
            }
        }
        for (&gref, a) in &active {
            let (word, _) = g
                .entry(gref)
                .map_err(|_| GrantError::NoTable(GRANT_TABLE_GPA))?;
            let mut bits = u32::from(GTF_READING);
            if a.writers > 0 {
                bits |= u32::from(GTF_WRITING);
            }
            word.fetch_or(bits, Ordering::AcqRel);
            sync_flags(word, Some(a));
        }
        {
            let mut st = g.state.lock().map_err(|_| bad("poisoned state".into()))?;
            st.active = active.into_iter().collect();
            st.handles = handles;
            st.next = state.next_handle as usize;
        }
        Ok(g)
    }
}

// ---------------------------------------------------------------------------------
// The hypercall.

fn status(r: Result<(), Errno>) -> i16 {
    match r {
        Ok(()) => 0,
        Err(e) => e.to_ret() as i16,
    }
}

impl Grants {
    /// `grant_table_op(cmd, gpa, count)` from a vCPU of this domain whose CR3 is
    /// `cr3`. `mmu` is this domain's PV MMU (maps and unmaps write L1 entries through
    /// it, in the pool of this domain's memory); other domains are found in `granters`.
    pub fn grant_table_op(
        &self,
        mmu: &Mutex<Mmu>,
        granters: &dyn Granters,
        cr3: u64,
        cmd: u64,
        gpa: u64,
        count: u64,
    ) -> Result<u64, Errno> {
        let mem = &self.mem;
        match cmd {
            GNTTABOP_MAP_GRANT_REF => batch(mem, gpa, count, |op: &mut GnttabMapGrantRef| {
                match self.map_one(mmu, granters, cr3, op) {
                    Ok((handle, bus)) => {
                        op.status = 0;
                        op.handle = handle;
                        op.dev_bus_addr = bus;
                    }
                    Err(e) => op.status = e.to_ret() as i16,
                }
                // Outputs: status, handle, dev_bus_addr.
                crate::field_span!(GnttabMapGrantRef, status..=dev_bus_addr)
            }),
            GNTTABOP_UNMAP_GRANT_REF => batch(mem, gpa, count, |op: &mut GnttabUnmapGrantRef| {
                op.status = status(self.unmap_one(mmu, granters, cr3, op));
                crate::field_span!(GnttabUnmapGrantRef, status)
            }),
            GNTTABOP_SETUP_TABLE => batch(mem, gpa, count, |op: &mut GnttabSetupTable| {
                op.status = status(self.setup_table(granters, op));
                crate::field_span!(GnttabSetupTable, status)
            }),
            GNTTABOP_COPY => batch(mem, gpa, count, |op: &mut GnttabCopy| {
                op.status = status(self.copy_one(granters, op));
                crate::field_span!(GnttabCopy, status)
            }),
            GNTTABOP_QUERY_SIZE => batch(mem, gpa, count, |op: &mut GnttabQuerySize| {
                op.status = status(self.check_self(granters, op.dom).and_then(|()| {
                    if op.reserved0 != 0 || op.reserved1 != 0 {
                        return Err(Errno::EINVAL);
                    }
                    op.nr_frames = GRANT_TABLE_FRAMES;
                    op.max_nr_frames = GRANT_TABLE_FRAMES;
                    Ok(())
                }));
                crate::field_span!(GnttabQuerySize, nr_frames..=status)
            }),
            _ => Err(Errno::EINVAL),
        }
    }
}

/// Runs `f` on each of `count` operations at `gpa` (copied in first, all at once) and
/// writes back the bytes of each that `f` says are its outputs (a [`crate::field_span!`]).
fn batch<T: FromBytes + IntoBytes + Immutable + Clone>(
    mem: &DomainMemory,
    gpa: u64,
    count: u64,
    mut f: impl FnMut(&mut T) -> std::ops::Range<usize>,
) -> Result<u64, Errno> {
    if count == 0 {
        // Nothing to do: the address is not looked at (SPEC 8.8).
        return Ok(0);
    }
    let mut ops: Vec<T> = guest_arg::copy_in_array(mem, gpa, count, GNTTAB_MAX_BATCH)?;
    let size = std::mem::size_of::<T>() as u64;
    for (i, op) in (0u64..).zip(ops.iter_mut()) {
        let out = f(op);
        // The whole array was checked when it was read; RAM does not shrink.
        let _ = guest_arg::copy_out_span(mem, gpa + i * size, op, out);
    }
    Ok(0)
}

const MAP_FLAGS: u32 =
    GNTMAP_DEVICE_MAP | GNTMAP_HOST_MAP | GNTMAP_READONLY | GNTMAP_APPLICATION_MAP;

/// One side of a copy, pinned if it is a grant.
struct Side<'a> {
    dom: Peer<'a>,
    gpa: u64,
    pin: Option<(u32, bool)>,
}

impl Side<'_> {
    fn release(self) {
        if let Some((gref, write)) = self.pin {
            self.dom.unpin(gref, write, None);
        }
    }
}

impl Grants {
    fn setup_table(&self, granters: &dyn Granters, op: &GnttabSetupTable) -> Result<(), Errno> {
        self.check_self(granters, op.dom)?;
        if op.reserved0 != 0 || op.reserved1 != [0; 3] {
            return Err(Errno::EINVAL);
        }
        if op.nr_frames == 0 || op.nr_frames > GRANT_TABLE_FRAMES {
            return Err(Errno::EINVAL);
        }
        let frames: Vec<u64> = (0..u64::from(op.nr_frames))
            .map(|i| (GRANT_TABLE_GPA >> 12) + i)
            .collect();
        self.mem
            .write_ram(op.frame_list, frames.as_bytes())
            .map_err(|_| Errno::EFAULT)
    }

    fn map_one(
        &self,
        mmu: &Mutex<Mmu>,
        granters: &dyn Granters,
        cr3: u64,
        op: &GnttabMapGrantRef,
    ) -> Result<(u32, u64), Errno> {
        if op.flags & !MAP_FLAGS != 0 || op.flags & GNTMAP_HOST_MAP == 0 {
            return Err(Errno::EINVAL);
        }
        let va = op.host_addr;
        let canonical = (va as i64) << 16 >> 16 == va as i64;
        if !canonical
            || va % PAGE_SIZE != 0
            || (layout::HV_RESERVED_VA_START..layout::HV_RESERVED_VA_END).contains(&va)
        {
            return Err(Errno::EINVAL);
        }
        let write = op.flags & GNTMAP_READONLY == 0;
        let granter = self.lookup(granters, op.dom)?;
        if op.ref_ >= NR_GRANT_REFS {
            return Err(Errno::ENOENT);
        }
        let h = self.reserve(granter.key())?;
        let me = (self.key(), h);
        let frame = match granter.pin(self.domid, op.ref_, write, Some(me)) {
            Ok(f) => f,
            Err(e) => {
                self.free(h);
                return Err(e);
            }
        };
        match self.complete_map(mmu, cr3, h, &granter, frame, op) {
            Ok(bus) => Ok((h, bus)),
            Err(e) => {
                granter.unpin(op.ref_, write, Some(me));
                self.free(h);
                Err(e)
            }
        }
    }

    /// Second half of a map: shows the frame in the reserved slot and writes the L1
    /// entry.
    fn complete_map(
        &self,
        mmu: &Mutex<Mmu>,
        cr3: u64,
        h: u32,
        granter: &Grants,
        frame: u64,
        op: &GnttabMapGrantRef,
    ) -> Result<u64, Errno> {
        let write = op.flags & GNTMAP_READONLY == 0;
        let mut st = self.lock()?;
        if st.dead {
            return Err(Errno::ESRCH);
        }
        match st.handles.get(h as usize) {
            Some(Handle::Pending { revoked: false, .. }) => {}
            // The granter died since the entry was pinned.
            _ => return Err(Errno::ESRCH),
        }
        let slot_gpa = self.slot_gpa(h);
        let mut pte = slot_gpa | PTE_P | PTE_A;
        if write {
            pte |= PTE_W | PTE_D;
        }
        if op.flags & GNTMAP_APPLICATION_MAP != 0 {
            pte |= PTE_U;
        }
        let mut mmu = mmu.lock().map_err(|_| Errno::EIO)?;
        if !mmu.is_pinned_l4(cr3 & PTE_ADDR_MASK) {
            return Err(Errno::EINVAL);
        }
        let mut pool = PoolAccess(&self.mem);
        let at = l1_entry_for(&pool, cr3, op.host_addr)?;
        // Check before the slot changes (the MMU lock is held until the entry is written).
        if mmu
            .frame(at)
            .is_none_or(|f| f.level != 1 || f.type_count == 0)
        {
            return Err(Errno::EINVAL);
        }
        if crate::mmu::PtMemory::read_pte(&pool, at) & PTE_P != 0 {
            return Err(Errno::EBUSY);
        }
        self.window
            .map(h, granter.mem.memfd(), frame, !write)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot map a granted frame into the window");
                Errno::ENOMEM
            })?;
        if let Err(e) = mmu.hv_write_l1(&mut pool, at, None, pte) {
            self.window.scratch(h);
            return Err(e);
        }
        st.handles[h as usize] = Handle::Live(Mapping {
            granter: granter.key(),
            gref: op.ref_,
            write,
            pte,
        });
        tracing::trace!(
            handle = h,
            gref = op.ref_,
            granter = granter.domid,
            "grant mapped"
        );
        Ok(slot_gpa)
    }

    fn unmap_one(
        &self,
        mmu: &Mutex<Mmu>,
        granters: &dyn Granters,
        cr3: u64,
        op: &GnttabUnmapGrantRef,
    ) -> Result<(), Errno> {
        if op.reserved != 0 {
            return Err(Errno::EINVAL);
        }
        let h = op.handle;
        let live = {
            let mut st = self.lock()?;
            let (live, pte) = match st.handles.get(h as usize) {
                Some(Handle::Live(m)) => (Some(*m), m.pte),
                Some(Handle::Dead(pte)) => (None, *pte),
                _ => return Err(Errno::EINVAL),
            };
            // Clear the L1 entry if it still holds what map wrote, then drop the frame.
            self.clear_pte(mmu, cr3, op.host_addr, pte);
            self.window.scratch(h);
            st.handles[h as usize] = Handle::Free;
            live
        };
        if let Some(m) = live {
            if let Some(granter) = self.find(granters, m.granter) {
                granter.unpin(m.gref, m.write, Some((self.key(), h)));
            }
        }
        Ok(())
    }

    /// Clears the L1 entry for `va` under `cr3` if it holds `pte`. A failed walk
    /// changes nothing.
    fn clear_pte(&self, mmu: &Mutex<Mmu>, cr3: u64, va: u64, pte: u64) {
        let Ok(mut mmu) = mmu.lock() else { return };
        if !mmu.is_pinned_l4(cr3 & PTE_ADDR_MASK) {
            return;
        }
        let mut pool = PoolAccess(&self.mem);
        let Ok(at) = l1_entry_for(&pool, cr3, va) else {
            return;
        };
        // Left alone unless it still holds exactly what map wrote.
        let _ = mmu.hv_write_l1(&mut pool, at, Some(pte), 0);
    }

    fn copy_side<'a>(
        &'a self,
        granters: &dyn Granters,
        p: &GnttabCopyPtr,
        gref: bool,
        write: bool,
    ) -> Result<Side<'a>, Errno> {
        let off = u64::from(p.offset);
        if gref {
            let granter = self.lookup(granters, p.domid)?;
            let r = u32::try_from(p.ref_or_gfn).map_err(|_| Errno::ENOENT)?;
            let frame = granter.pin(self.domid, r, write, None)?;
            Ok(Side {
                dom: granter,
                gpa: frame * PAGE_SIZE + off,
                pin: Some((r, write)),
            })
        } else {
            if p.domid != DOMID_SELF && u32::from(p.domid) != self.domid {
                return Err(Errno::EPERM);
            }
            if p.ref_or_gfn >= self.mem.ram_bytes() / PAGE_SIZE {
                return Err(Errno::EINVAL);
            }
            Ok(Side {
                dom: Peer::Me(self),
                gpa: p.ref_or_gfn * PAGE_SIZE + off,
                pin: None,
            })
        }
    }

    fn copy_one(&self, granters: &dyn Granters, op: &GnttabCopy) -> Result<(), Errno> {
        if op.flags & !(GNTCOPY_SOURCE_GREF | GNTCOPY_DEST_GREF) != 0
            || op.reserved != 0
            || op.source.reserved != 0
            || op.dest.reserved != 0
        {
            return Err(Errno::EINVAL);
        }
        let len = u64::from(op.len);
        if u64::from(op.source.offset) + len > PAGE_SIZE
            || u64::from(op.dest.offset) + len > PAGE_SIZE
        {
            return Err(Errno::EINVAL);
        }
        let src = self.copy_side(
            granters,
            &op.source,
            op.flags & GNTCOPY_SOURCE_GREF != 0,
            false,
        )?;
        let dst = match self.copy_side(granters, &op.dest, op.flags & GNTCOPY_DEST_GREF != 0, true)
        {
            Ok(d) => d,
            Err(e) => {
                src.release();
                return Err(e);
            }
        };
        let r = copy_bytes(&src, &dst, op.len as usize);
        src.release();
        dst.release();
        r
    }
}

/// Copies host-to-host between the two domains' RAM mappings (memmove semantics, so
/// overlapping ranges of one frame are fine).
fn copy_bytes(src: &Side<'_>, dst: &Side<'_>, len: usize) -> Result<(), Errno> {
    if len == 0 {
        return Ok(());
    }
    let s = src
        .dom
        .mem
        .guest_memory()
        .get_slice(GuestAddress(src.gpa), len)
        .map_err(|_| Errno::EINVAL)?;
    let d = dst
        .dom
        .mem
        .guest_memory()
        .get_slice(GuestAddress(dst.gpa), len)
        .map_err(|_| Errno::EINVAL)?;
    s.copy_to_volatile_slice(d);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Death.

impl Grants {
    /// Releases everything this dying domain granted or mapped (called once its vCPUs
    /// have stopped and it has left `granters`; idempotent): its mappings of other
    /// domains' grants are unmapped (their entries' counts and flags updated), and every
    /// mapping another domain holds of its grants shows scratch memory from now on
    /// (that domain's handle stays allocated until it unmaps it). Nothing can be pinned
    /// or mapped through these grants afterwards.
    pub fn destroy(&self, granters: &dyn Granters) {
        let me = self.key();
        let (active, mine) = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            if st.dead {
                return;
            }
            st.dead = true;
            let active = std::mem::take(&mut st.active);
            let mut mine = Vec::new();
            for (h, slot) in st.handles.iter_mut().enumerate() {
                match *slot {
                    Handle::Live(m) => {
                        self.window.scratch(h as u32);
                        mine.push((h as u32, m));
                    }
                    Handle::Dead(_) => self.window.scratch(h as u32),
                    Handle::Free | Handle::Pending { .. } => continue,
                }
                *slot = Handle::Free;
            }
            (active, mine)
        };
        // Others' mappings of this domain's grants.
        for act in active.into_values() {
            for (mapper, h) in act.maps {
                if mapper == me {
                    continue;
                }
                if let Some(m) = self.find(granters, mapper) {
                    m.revoke(h, me);
                }
            }
        }
        // This domain's mappings of others' grants.
        for (h, m) in mine {
            if m.granter == me {
                continue;
            }
            if let Some(granter) = self.find(granters, m.granter) {
                granter.unpin(m.gref, m.write, Some((me, h)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::DomainMemory;
    use crate::mmu::{FlatPool, Layout, Mmu, PtMemory};

    fn read_u64(addr: usize) -> u64 {
        // SAFETY: test-only read of a mapped, 8-aligned host address.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }

    fn write_u64(addr: usize, v: u64) {
        // SAFETY: test-only write of a mapped, writable, 8-aligned host address.
        unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
    }

    #[test]
    fn window_slot_shares_the_granted_frame_and_scratch_forgets_it() {
        let mem = DomainMemory::new("g", 4 << 20, 8).unwrap();
        mem.write_ram(5 * PAGE_SIZE, &0x1122_3344_u64.to_le_bytes())
            .unwrap();
        let w = Window::new(4).unwrap();
        assert_eq!(read_u64(w.slot(2)), 0, "an unused slot is zero");
        w.map(2, mem.memfd(), 5, false).unwrap();
        assert_eq!(read_u64(w.slot(2)), 0x1122_3344);
        write_u64(w.slot(2) + 8, 0xABCD);
        let mut b = [0u8; 8];
        mem.read_ram(5 * PAGE_SIZE + 8, &mut b).unwrap();
        assert_eq!(
            u64::from_le_bytes(b),
            0xABCD,
            "writes reach the granter's RAM"
        );
        w.scratch(2);
        assert_eq!(read_u64(w.slot(2)), 0);
        mem.read_ram(5 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(
            u64::from_le_bytes(b),
            0x1122_3344,
            "the frame itself is untouched"
        );
        // Read-only mapping: readable (writing it would fault the host).
        w.map(1, mem.memfd(), 5, true).unwrap();
        assert_eq!(read_u64(w.slot(1)), 0x1122_3344);
    }

    #[test]
    fn window_entries_are_refused_to_guests_and_harmless_when_untyped() {
        let pool = 0x40_0000;
        let layout = Layout {
            phys_bits: 46,
            ram_frames: 1024,
            pool_base: pool,
            pool_frames: 4,
        };
        let window = window_gpa_for(pool + 4 * PAGE_SIZE);
        assert_eq!(window, 0x60_0000);
        let pte = window | PTE_P | PTE_A | PTE_W | PTE_D;
        assert_eq!(layout.check_entry(1, 0, pte), Err(Errno::EACCES));
        let mut mem = FlatPool::new(pool, 4);
        let mut mmu = Mmu::new(layout);
        mmu.pin(&mut mem, 1, pool).unwrap();
        // Only a validated L1 takes a grant entry, and only in a free slot.
        assert_eq!(
            mmu.hv_write_l1(&mut mem, pool + PAGE_SIZE, None, pte),
            Err(Errno::EINVAL)
        );
        mmu.hv_write_l1(&mut mem, pool + 8, None, pte).unwrap();
        assert_eq!(mem.read_pte(pool + 8), pte);
        assert_eq!(
            mmu.hv_write_l1(&mut mem, pool + 8, None, pte),
            Err(Errno::EBUSY)
        );
        // A guest update cannot copy it elsewhere.
        assert_eq!(
            mmu.write_entry(&mut mem, pool + 16, pte),
            Err(Errno::EACCES)
        );
        // Untyping the table with the entry in it is harmless; typing it again is not
        // allowed until the entry is gone.
        mmu.unpin(&mut mem, pool, false).unwrap();
        assert!(mmu.frames().iter().all(|f| f.type_count == 0));
        assert_eq!(mmu.pin(&mut mem, 1, pool), Err(Errno::EACCES));
        mem.write_pte(pool + 8, 0);
        mmu.pin(&mut mem, 1, pool).unwrap();
        // Clearing records the old target for coherence.
        mmu.hv_write_l1(&mut mem, pool + 8, None, pte).unwrap();
        assert_eq!(
            mmu.hv_write_l1(&mut mem, pool + 8, Some(pte | PTE_U), 0),
            Err(Errno::EBUSY)
        );
        mmu.take_changes();
        mmu.hv_write_l1(&mut mem, pool + 8, Some(pte), 0).unwrap();
        assert_eq!(mmu.take_changes().old_l1_targets, vec![window]);
    }
}
