//! The early console: where a domain's `console_io` output goes.
//!
//! Output is escaped: control bytes other than newline, carriage return and tab, and
//! DEL, become `\xNN`, so a guest cannot drive the user's terminal.
//!
//! With several domains on one standard output ([`ConsoleSink::PrefixedStdout`]), each
//! complete line is written whole with the domain's name in front, so lines of
//! different domains never interleave mid-line.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Where console output goes.
#[derive(Clone, Debug, Default)]
pub enum ConsoleSink {
    /// hv's standard output.
    #[default]
    Stdout,
    /// hv's standard output, line-buffered, each line as `[prefix] text`.
    PrefixedStdout(Arc<str>),
    /// An in-memory buffer (tests, benchmarks).
    Capture(Arc<Mutex<Vec<u8>>>),
    /// A file (`hv run --console-output`), escaped as on standard output.
    File(Arc<Mutex<std::fs::File>>),
    /// Dropped.
    Discard,
}

impl ConsoleSink {
    /// A capture sink and the buffer it fills.
    pub fn capture() -> (ConsoleSink, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (ConsoleSink::Capture(buf.clone()), buf)
    }
}

/// A domain's console.
#[derive(Debug)]
pub struct Console {
    sink: ConsoleSink,
    /// The unfinished last line, for [`ConsoleSink::PrefixedStdout`] (escaped).
    partial: Mutex<Vec<u8>>,
}

/// A line longer than this (escaped bytes) without a newline is broken, so a guest
/// cannot make the host buffer without bound.
pub const MAX_LINE: usize = 4096;

/// Buffers `escaped` output after `partial` and returns the complete lines, each as
/// `[prefix] line\n`; the unfinished rest stays in `partial` (broken at [`MAX_LINE`]).
/// Carriage returns are dropped: one could move the cursor back over the prefix.
pub fn prefixed_lines(prefix: &str, partial: &mut Vec<u8>, escaped: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in escaped {
        if b == b'\n' {
            push_line(prefix, partial, &mut out);
        } else if b != b'\r' {
            partial.push(b);
            if partial.len() >= MAX_LINE {
                push_line(prefix, partial, &mut out);
            }
        }
    }
    out
}

/// Moves `partial` to `out` as one prefixed line.
fn push_line(prefix: &str, partial: &mut Vec<u8>, out: &mut Vec<u8>) {
    out.push(b'[');
    escape_into(prefix.as_bytes(), out);
    out.extend_from_slice(b"] ");
    out.append(partial);
    out.push(b'\n');
}

fn write_stdout(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the domain down: the output is lost.
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// Appends `bytes` to `out`, escaping terminal control bytes.
pub fn escape_into(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        match b {
            b'\n' | b'\r' | b'\t' => out.push(b),
            0..=0x1F | 0x7F => {
                let _ = write!(out, "\\x{b:02x}");
            }
            _ => out.push(b),
        }
    }
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: ConsoleSink) -> Self {
        Console {
            sink,
            partial: Mutex::new(Vec::new()),
        }
    }

    /// Writes out an unfinished last line (prefixed sinks; a no-op otherwise).
    pub fn flush(&self) {
        if let ConsoleSink::PrefixedStdout(prefix) = &self.sink {
            let out = match self.partial.lock() {
                Ok(mut p) if !p.is_empty() => {
                    let mut out = Vec::new();
                    push_line(prefix, &mut p, &mut out);
                    out
                }
                _ => return,
            };
            write_stdout(&out);
        }
    }

    /// Writes guest output.
    pub fn write(&self, bytes: &[u8]) {
        let mut escaped = Vec::with_capacity(bytes.len() + 8);
        escape_into(bytes, &mut escaped);
        match &self.sink {
            ConsoleSink::Stdout => write_stdout(&escaped),
            ConsoleSink::PrefixedStdout(prefix) => {
                // Lines are cut under the buffer's lock and written under stdout's, so
                // each line reaches stdout in one piece and in order.
                let Ok(mut p) = self.partial.lock() else {
                    return;
                };
                let out = prefixed_lines(prefix, &mut p, &escaped);
                write_stdout(&out);
            }
            ConsoleSink::Capture(buf) => {
                if let Ok(mut b) = buf.lock() {
                    b.extend_from_slice(&escaped);
                }
            }
            ConsoleSink::File(f) => {
                if let Ok(mut f) = f.lock() {
                    // A full disk must not take the domain down: the output is lost.
                    let _ = f.write_all(&escaped);
                }
            }
            ConsoleSink::Discard => {}
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls() {
        let mut v = Vec::new();
        escape_into(b"a\x1b[2Jb\n\t\x7f\xc3\xa9", &mut v);
        assert_eq!(v, b"a\\x1b[2Jb\n\t\\x7f\xc3\xa9");
    }

    #[test]
    fn prefixed_lines_are_whole() {
        let mut partial = Vec::new();
        assert_eq!(prefixed_lines("a", &mut partial, b"one"), b"");
        assert_eq!(
            prefixed_lines("a", &mut partial, b" two\r\nthree\n\nfo"),
            b"[a] one two\n[a] three\n[a] \n"
        );
        assert_eq!(partial, b"fo");
        let long = vec![b'x'; MAX_LINE + 10];
        let out = prefixed_lines("a", &mut partial, &long);
        assert_eq!(out.len(), 4 + MAX_LINE + 1);
        assert!(out.starts_with(b"[a] foxx") && out.ends_with(b"x\n"));
        assert_eq!(partial.len(), 12);
        // The prefix is escaped too.
        let mut partial = Vec::new();
        assert_eq!(prefixed_lines("\x1b", &mut partial, b"x\n"), b"[\\x1b] x\n");
    }
}
