//! The early console: where a domain's `console_io` output goes.
//!
//! Output is escaped: control bytes other than newline, carriage return and tab, and
//! DEL, become `\xNN`, so a guest cannot drive the user's terminal.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Where console output goes.
#[derive(Clone, Debug, Default)]
pub enum ConsoleSink {
    /// hv's standard output.
    #[default]
    Stdout,
    /// An in-memory buffer (tests, benchmarks).
    Capture(Arc<Mutex<Vec<u8>>>),
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
        Console { sink }
    }

    /// Writes guest output.
    pub fn write(&self, bytes: &[u8]) {
        let mut escaped = Vec::with_capacity(bytes.len() + 8);
        escape_into(bytes, &mut escaped);
        match &self.sink {
            ConsoleSink::Stdout => {
                let mut out = std::io::stdout().lock();
                // A closed stdout must not take the domain down: the output is lost.
                let _ = out.write_all(&escaped);
                let _ = out.flush();
            }
            ConsoleSink::Capture(buf) => {
                if let Ok(mut b) = buf.lock() {
                    b.extend_from_slice(&escaped);
                }
            }
            ConsoleSink::Discard => {}
        }
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
}
