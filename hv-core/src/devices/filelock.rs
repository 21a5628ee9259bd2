//! Advisory locks on the host files behind devices (disk images, passthrough
//! regions), so that two hv processes cannot both write one file, and the name of the
//! process that holds a lock for the error that refuses it.
//!
//! hv takes `flock` locks on the open file: shared for a read-only disk, exclusive for
//! a writable disk or a passthrough region. A lock lives as long as the open file (it
//! is released when the device's file is closed, or the process ends). Why `flock`:
//! POSIX record locks (`F_SETLK`) belong to the process and are dropped when *any*
//! descriptor of the file is closed, and never conflict within one process; OFD locks
//! (`F_OFD_SETLK`) behave like `flock` here, but the kernel names no owner for them
//! (`F_OFD_GETLK` and `/proc/locks` report pid -1). `/proc/locks` lists the pid that
//! took each `flock` lock, which [`holder`] reads to name the holder.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

/// How a file is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Shared with other shared holders (read-only use).
    Shared,
    /// No other holder (writable use).
    Exclusive,
}

impl LockKind {
    /// How the holder of such a lock uses the file: `read-only` or `writable`.
    pub fn use_name(self) -> &'static str {
        match self {
            LockKind::Shared => "read-only",
            LockKind::Exclusive => "writable",
        }
    }
}

/// A process holding a lock on a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command line (or command name), if it could be read.
    pub command: Option<String>,
    /// Its lock.
    pub kind: LockKind,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {}", self.pid)?;
        if self.pid == std::process::id() {
            f.write_str(" (this process)")?;
        } else if let Some(c) = &self.command {
            write!(f, " ({c})")?;
        }
        write!(f, ", which has it open {}", self.kind.use_name())
    }
}

/// Who holds a lock, for messages: the holder if known, else "another process".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderText(pub Option<Box<Holder>>);

impl fmt::Display for HolderText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(h) => h.fmt(f),
            None => f.write_str("another process (the file is locked)"),
        }
    }
}

/// Most bytes of a holder's command line shown.
const MAX_COMMAND: usize = 200;

/// Takes a lock on `file` without waiting. `Ok(false)` if another open file holds a
/// conflicting lock.
pub fn try_lock(file: &File, kind: LockKind) -> std::io::Result<bool> {
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    // SAFETY: flock on the file's own open descriptor; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A process whose `flock` lock on `file` conflicts with a lock of kind `wanted`
/// (from `/proc/locks`), if one can be found: the holder of an exclusive lock first.
/// `None` if the holder is gone or `/proc` cannot be read.
pub fn holder(file: &File, wanted: LockKind) -> Option<Box<Holder>> {
    let md = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let mut found = parse_proc_locks(
        &locks,
        libc::major(md.dev()),
        libc::minor(md.dev()),
        md.ino(),
    )
    .into_iter()
    .filter(|(_, kind)| wanted == LockKind::Exclusive || *kind == LockKind::Exclusive)
    .collect::<Vec<_>>();
    found.sort_by_key(|(_, kind)| *kind == LockKind::Shared);
    let (pid, kind) = found.into_iter().next()?;
    Some(Box::new(Holder {
        pid,
        command: command_of(pid),
        kind,
    }))
}

/// The `flock` locks on file (`major`, `minor`, `ino`) in `/proc/locks` text: (pid,
/// kind) of each granted lock (waiters, marked `->`, are skipped).
fn parse_proc_locks(text: &str, major: u32, minor: u32, ino: u64) -> Vec<(u32, LockKind)> {
    let mut out = Vec::new();
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 10259 fe:00:10010803 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let kind = match f[3] {
            "WRITE" => LockKind::Exclusive,
            "READ" => LockKind::Shared,
            _ => continue,
        };
        let Ok(pid) = f[4].parse::<u32>() else {
            continue;
        };
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(i), None) = (id.next(), id.next(), id.next(), id.next())
        else {
            continue;
        };
        let same = u32::from_str_radix(ma, 16) == Ok(major)
            && u32::from_str_radix(mi, 16) == Ok(minor)
            && i.parse::<u64>() == Ok(ino);
        if same && pid != 0 {
            out.push((pid, kind));
        }
    }
    out
}

/// Process `pid`'s command line (arguments separated by spaces, shortened), else its
/// command name.
fn command_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut cmd = if args.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_string()
    } else {
        args.join(" ")
    };
    // Control characters would let a command line drive the user's terminal.
    cmd = cmd
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if cmd.len() > MAX_COMMAND {
        let mut end = MAX_COMMAND;
        while !cmd.is_char_boundary(end) {
            end -= 1;
        }
        cmd.truncate(end);
        cmd.push_str("...");
    }
    Some(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines() {
        let text = "1: OFDLCK ADVISORY  WRITE -1 fe:00:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 10259 fe:00:10010803 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 31 fe:00:10010803 0 EOF\n\
                    3: -> FLOCK  ADVISORY  WRITE 32 fe:00:10010803 0 EOF\n\
                    4: FLOCK  ADVISORY  READ 33 fe:01:10010803 0 EOF\n\
                    5: POSIX  ADVISORY  WRITE 34 fe:00:10010803 0 EOF\n";
        assert_eq!(
            parse_proc_locks(text, 0xfe, 0, 10010803),
            vec![(10259, LockKind::Exclusive), (31, LockKind::Shared)]
        );
        assert!(parse_proc_locks(text, 0xfe, 0, 77).is_empty());
    }

    #[test]
    fn locks_conflict_between_open_files_and_name_the_holder() {
        let path = std::env::temp_dir().join(format!("hv-filelock-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let open = || File::open(&path).unwrap();
        let (a, b, c) = (open(), open(), open());
        assert!(try_lock(&a, LockKind::Shared).unwrap());
        assert!(try_lock(&b, LockKind::Shared).unwrap());
        assert!(!try_lock(&c, LockKind::Exclusive).unwrap());
        let h = holder(&c, LockKind::Exclusive).expect("a holder in /proc/locks");
        assert_eq!(h.pid, std::process::id());
        assert_eq!(h.kind, LockKind::Shared);
        assert!(
            h.to_string()
                .contains("(this process), which has it open read-only"),
            "{h}"
        );
        // A shared lock conflicts only with an exclusive one.
        assert_eq!(holder(&c, LockKind::Shared), None);
        drop((a, b));
        assert!(try_lock(&c, LockKind::Exclusive).unwrap());
        let d = open();
        assert!(!try_lock(&d, LockKind::Shared).unwrap());
        assert_eq!(
            holder(&d, LockKind::Shared).unwrap().kind,
            LockKind::Exclusive
        );
        std::fs::remove_file(&path).unwrap();
    }
}
