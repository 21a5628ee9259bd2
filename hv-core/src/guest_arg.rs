//! Hypercall arguments in guest memory: the one place where structures and arrays a
//! guest points at are copied in and results copied out, with the ABI's error mapping.
//!
//! Every argument is copied into host memory once before it is looked at (no double
//! fetch: the guest may change its memory concurrently), and only RAM is reachable
//! (never the page-table pool, the grant window or a passthrough region). Errors, as
//! SPEC §4.3 gives them:
//! - `EFAULT`: the range is not entirely in the domain's RAM (or wraps around);
//! - `E2BIG`: an array longer than the operation allows.
//!
//! Results that are only some fields of a structure are written back with
//! [`copy_out_span`] and a byte span named by fields ([`field_span!`]), so that the
//! other fields of the guest's structure are left as the guest wrote them.
//!
//! Owns nothing; uses only [`crate::memory`].

use std::ops::Range;

use hv_abi::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::memory::DomainMemory;

/// Copies a `T` in from guest RAM at `gpa`.
pub fn copy_in<T: FromBytes + IntoBytes>(mem: &DomainMemory, gpa: u64) -> Result<T, Errno> {
    mem.read_obj(gpa).map_err(|_| Errno::EFAULT)
}

/// Copies `buf.len()` bytes in from guest RAM at `gpa`.
pub fn copy_in_bytes(mem: &DomainMemory, gpa: u64, buf: &mut [u8]) -> Result<(), Errno> {
    mem.read_ram(gpa, buf).map_err(|_| Errno::EFAULT)
}

/// Copies an array of `n` `T`s in from guest RAM at `gpa`; `E2BIG` if `n > max`.
pub fn copy_in_array<T: FromBytes + IntoBytes + Clone>(
    mem: &DomainMemory,
    gpa: u64,
    n: u64,
    max: u64,
) -> Result<Vec<T>, Errno> {
    if n > max {
        return Err(Errno::E2BIG);
    }
    let len = usize::try_from(n).map_err(|_| Errno::E2BIG)?;
    let mut v = vec![T::new_zeroed(); len];
    copy_in_bytes(mem, gpa, v.as_mut_slice().as_mut_bytes())?;
    Ok(v)
}

/// Copies `v` out to guest RAM at `gpa`.
pub fn copy_out<T: IntoBytes + Immutable>(
    mem: &DomainMemory,
    gpa: u64,
    v: &T,
) -> Result<(), Errno> {
    mem.write_obj(gpa, v).map_err(|_| Errno::EFAULT)
}

/// Copies the bytes `span` of `v` out to the `T` at `gpa` in guest RAM (the other
/// bytes of the guest's structure are not written). `span` usually comes from
/// [`field_span!`]; a span beyond `T` is `EFAULT`.
pub fn copy_out_span<T: IntoBytes + Immutable>(
    mem: &DomainMemory,
    gpa: u64,
    v: &T,
    span: Range<usize>,
) -> Result<(), Errno> {
    let bytes = v.as_bytes().get(span.clone()).ok_or(Errno::EFAULT)?;
    let at = gpa.checked_add(span.start as u64).ok_or(Errno::EFAULT)?;
    mem.write_ram(at, bytes).map_err(|_| Errno::EFAULT)
}

/// `EFAULT` unless `[gpa, gpa + len)` lies in guest RAM (for outputs that must be
/// known writable before an operation has effects).
pub fn check(mem: &DomainMemory, gpa: u64, len: u64) -> Result<(), Errno> {
    mem.check_ram(gpa, len).map_err(|_| Errno::EFAULT)
}

/// The size of the field a projection names (for [`field_span!`]).
#[doc(hidden)]
pub fn field_size<T, F>(_project: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// The byte span of fields `first` to `last` (inclusive, in declaration order) of a
/// `#[repr(C)]` type: `field_span!(GnttabMapGrantRef, status..=dev_bus_addr)`.
#[macro_export]
macro_rules! field_span {
    ($t:ty, $first:ident ..= $last:ident) => {{
        let end =
            ::core::mem::offset_of!($t, $last) + $crate::guest_arg::field_size(|v: &$t| &v.$last);
        ::core::mem::offset_of!($t, $first)..end
    }};
    ($t:ty, $only:ident) => {
        $crate::field_span!($t, $only..=$only)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use hv_abi::grant::GnttabMapGrantRef;

    fn mem() -> DomainMemory {
        DomainMemory::new("guest-arg", 4 << 20, 1).expect("memory")
    }

    #[test]
    fn spans_name_the_fields() {
        assert_eq!(
            field_span!(GnttabMapGrantRef, status..=dev_bus_addr),
            18..32
        );
        assert_eq!(field_span!(GnttabMapGrantRef, handle), 20..24);
        assert_eq!(
            field_span!(hv_abi::grant::GnttabUnmapGrantRef, status),
            20..22
        );
        assert_eq!(field_span!(hv_abi::grant::GnttabSetupTable, status), 8..10);
        assert_eq!(field_span!(hv_abi::grant::GnttabCopy, status), 36..38);
        assert_eq!(
            field_span!(hv_abi::grant::GnttabQuerySize, nr_frames..=status),
            4..14
        );
    }

    #[test]
    fn copies_stay_in_ram_and_spans_write_only_their_bytes() {
        let m = mem();
        let ram = m.ram_bytes();
        assert_eq!(copy_in::<u64>(&m, ram - 4), Err(Errno::EFAULT));
        assert_eq!(copy_in::<u64>(&m, u64::MAX - 3), Err(Errno::EFAULT));
        assert_eq!(copy_in::<u64>(&m, m.pool_gpa()), Err(Errno::EFAULT));
        assert_eq!(
            copy_in_array::<u32>(&m, 0x1000, 129, 128),
            Err(Errno::E2BIG)
        );
        assert_eq!(
            copy_in_array::<u32>(&m, ram - 8, 4, 128),
            Err(Errno::EFAULT)
        );
        copy_out(&m, 0x2000, &[0xAAu8; 32]).expect("out");
        let op = GnttabMapGrantRef {
            status: -1,
            handle: 7,
            ..Default::default()
        };
        copy_out_span(
            &m,
            0x2000,
            &op,
            field_span!(GnttabMapGrantRef, status..=handle),
        )
        .expect("span");
        let back: [u8; 32] = copy_in(&m, 0x2000).expect("in");
        assert_eq!(&back[..18], &[0xAA; 18]);
        assert_eq!(&back[18..20], &(-1i16).to_le_bytes());
        assert_eq!(&back[24..], &[0xAA; 8]);
        assert_eq!(copy_out_span(&m, 0x2000, &op, 30..40), Err(Errno::EFAULT));
        assert_eq!(check(&m, ram - 1, 2), Err(Errno::EFAULT));
        assert_eq!(check(&m, 0, ram), Ok(()));
    }
}
