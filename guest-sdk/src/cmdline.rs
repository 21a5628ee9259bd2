//! Minimal command-line parsing: space-separated words, `key=value` or bare flags.
//!
//! The command line is [`StartInfo::cmdline_bytes`](hv_abi::start_info::StartInfo::cmdline_bytes),
//! raw bytes the host chose; nothing here assumes UTF-8.

/// The space-separated words of `cmdline` (empty words skipped).
pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// The value of the first `key=value` word, or `None`.
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    words(cmdline).find_map(|w| {
        let rest = w.strip_prefix(key)?;
        rest.strip_prefix(b"=")
    })
}

/// True if `flag` appears as a bare word.
pub fn has_flag(cmdline: &[u8], flag: &[u8]) -> bool {
    words(cmdline).any(|w| w == flag)
}

/// Parses an unsigned decimal number (no sign, no spaces); `None` if empty, not
/// decimal or above `u64::MAX`.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let c = b"  scenario=exit code=42 panic  x=";
        assert_eq!(value(c, b"scenario"), Some(&b"exit"[..]));
        assert_eq!(value(c, b"code"), Some(&b"42"[..]));
        assert_eq!(value(c, b"x"), Some(&b""[..]));
        assert_eq!(value(c, b"cod"), None);
        assert_eq!(value(c, b"panic"), None);
        assert!(has_flag(c, b"panic"));
        assert!(!has_flag(c, b"pan"));
        assert_eq!(words(c).count(), 4);
        assert_eq!(parse_u64(b"42"), Some(42));
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
    }
}
