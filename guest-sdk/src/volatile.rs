//! [`VolatileSlice`]: a bounds-checked view of memory that someone else may read or
//! write at any time (a passthrough region backed by a host file, a page granted to a
//! back-end), accessed only with volatile loads and stores.
//!
//! Rust references (`&[u8]`, `&mut [u8]`) promise that nobody else changes the memory
//! while they live, which shared memory cannot promise: this type hands out no
//! references, only copies.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::{read_volatile, write_volatile};

/// An access outside a [`VolatileSlice`], or misaligned for its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds {
    /// Byte offset of the access.
    pub offset: usize,
    /// Bytes accessed.
    pub len: usize,
    /// Length of the slice.
    pub slice_len: usize,
}

impl fmt::Display for OutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "access of {} bytes at offset {} outside (or misaligned in) a volatile slice of {} bytes",
            self.len, self.offset, self.slice_len
        )
    }
}

/// `len` bytes of shared memory from `ptr`, accessed with volatile operations only.
#[derive(Clone, Copy, Debug)]
pub struct VolatileSlice<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a mut [u8]>,
}

// SAFETY: the slice only performs volatile accesses of memory that its creator
// promised may be accessed concurrently (`VolatileSlice::new`); sharing the view
// between vCPUs adds nothing the other party does not already do.
unsafe impl Send for VolatileSlice<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for VolatileSlice<'_> {}

impl<'a> VolatileSlice<'a> {
    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped, readable and writable for `'a`, and must not
    /// be memory the program holds Rust references to (or relies on staying unchanged):
    /// other parties may change it at any time, and the view writes it.
    pub const unsafe fn new(ptr: *mut u8, len: usize) -> VolatileSlice<'a> {
        VolatileSlice {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// True if the view covers no byte.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address.
    pub const fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Checks an access of `len` bytes at `offset`, aligned to `align` (relative to
    /// the address).
    fn check(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8, OutOfBounds> {
        let err = OutOfBounds {
            offset,
            len,
            slice_len: self.len,
        };
        let end = offset.checked_add(len).ok_or(err)?;
        if end > self.len {
            return Err(err);
        }
        let p = self.ptr.wrapping_add(offset);
        if p.addr() % align != 0 {
            return Err(err);
        }
        Ok(p)
    }

    /// The view of `len` bytes from `offset`.
    pub fn subslice(&self, offset: usize, len: usize) -> Result<VolatileSlice<'a>, OutOfBounds> {
        let p = self.check(offset, len, 1)?;
        Ok(VolatileSlice {
            ptr: p,
            len,
            _life: PhantomData,
        })
    }

    /// Reads the byte at `offset`.
    pub fn read_u8(&self, offset: usize) -> Result<u8, OutOfBounds> {
        let p = self.check(offset, 1, 1)?;
        // SAFETY: in bounds (checked); `new`'s caller promised the memory is mapped.
        Ok(unsafe { read_volatile(p) })
    }

    /// Writes the byte at `offset`.
    pub fn write_u8(&self, offset: usize, v: u8) -> Result<(), OutOfBounds> {
        let p = self.check(offset, 1, 1)?;
        // SAFETY: as in `read_u8`; the memory is writable.
        unsafe { write_volatile(p, v) };
        Ok(())
    }

    /// Reads the 8-byte-aligned little-endian `u64` at `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked).
        Ok(unsafe { read_volatile(p.cast::<u64>()) })
    }

    /// Writes the 8-byte-aligned `u64` at `offset`.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<(), OutOfBounds> {
        let p = self.check(offset, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked); writable.
        unsafe { write_volatile(p.cast::<u64>(), v) };
        Ok(())
    }

    /// Copies `src` into the view at `offset` (8 bytes per store where aligned).
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, src.len(), 1)?;
        let mut i = 0;
        while i < src.len() && (p.addr() + i) % 8 != 0 {
            // SAFETY: `i < src.len()`, inside the checked range.
            unsafe { write_volatile(p.add(i), src[i]) };
            i += 1;
        }
        while i + 8 <= src.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&src[i..i + 8]);
            // SAFETY: inside the checked range and 8-aligned (the loop above aligned it).
            unsafe { write_volatile(p.add(i).cast::<u64>(), u64::from_ne_bytes(w)) };
            i += 8;
        }
        while i < src.len() {
            // SAFETY: as in the first loop.
            unsafe { write_volatile(p.add(i), src[i]) };
            i += 1;
        }
        Ok(())
    }

    /// Copies the view's bytes from `offset` into `dst` (8 bytes per load where
    /// aligned).
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let p = self.check(offset, dst.len(), 1)?;
        let mut i = 0;
        while i < dst.len() && (p.addr() + i) % 8 != 0 {
            // SAFETY: `i < dst.len()`, inside the checked range.
            dst[i] = unsafe { read_volatile(p.add(i)) };
            i += 1;
        }
        while i + 8 <= dst.len() {
            // SAFETY: inside the checked range and 8-aligned.
            let w = unsafe { read_volatile(p.add(i).cast::<u64>()) };
            dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
        while i < dst.len() {
            // SAFETY: as in the first loop.
            dst[i] = unsafe { read_volatile(p.add(i)) };
            i += 1;
        }
        Ok(())
    }

    /// Sets every byte of the view to `v`.
    pub fn fill(&self, v: u8) {
        let word = u64::from_ne_bytes([v; 8]);
        let mut i = 0;
        while i < self.len && (self.ptr.addr() + i) % 8 != 0 {
            // SAFETY: `i < len`: inside the view.
            unsafe { write_volatile(self.ptr.add(i), v) };
            i += 1;
        }
        while i + 8 <= self.len {
            // SAFETY: inside the view and 8-aligned.
            unsafe { write_volatile(self.ptr.add(i).cast::<u64>(), word) };
            i += 8;
        }
        while i < self.len {
            // SAFETY: inside the view.
            unsafe { write_volatile(self.ptr.add(i), v) };
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(8))]
    struct Buf([u8; 64]);

    #[test]
    fn bounds_and_copies() {
        let mut b = Buf([0; 64]);
        // SAFETY: the buffer outlives the view and is only used through it.
        let v = unsafe { VolatileSlice::new(b.0.as_mut_ptr(), 64) };
        assert_eq!(v.len(), 64);
        v.write_u64(8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(v.read_u64(8), Ok(0x1122_3344_5566_7788));
        assert!(v.read_u64(4).is_err(), "misaligned");
        assert!(v.read_u64(60).is_err(), "past the end");
        assert!(v.read_u8(64).is_err());
        assert!(v.subslice(60, 5).is_err());
        assert!(v.copy_from(usize::MAX, &[1]).is_err());
        let src: Vec<u8> = (0..37).collect();
        v.copy_from(3, &src).unwrap();
        let mut dst = [0u8; 37];
        v.copy_to(3, &mut dst).unwrap();
        assert_eq!(&dst[..], &src[..]);
        let s = v.subslice(40, 8).unwrap();
        s.fill(0xAB);
        assert_eq!(v.read_u8(39), Ok(src[36]));
        assert_eq!(v.read_u64(40), Ok(0xABAB_ABAB_ABAB_ABAB));
        assert_eq!(v.read_u8(48), Ok(0));
    }
}
