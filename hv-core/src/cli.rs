//! Command-line parsing helpers for the `hv` binary.

use std::path::PathBuf;

use thiserror::Error;

use crate::devices::disk::DiskSpec;
use crate::devices::passthrough::RegionSpec;
use crate::devices::{ConsoleInput, DeviceSpec};

/// A size argument that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid size {0:?}: use bytes or a number with K, M or G (for example 64M)")]
pub struct SizeError(pub String);

/// Parses `65536`, `64K`, `64M`, `1G` (binary units, optional `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(err()),
    };
    let n: u64 = num.trim().parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

/// A `--disk` or `--passthrough` argument that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {what} {arg:?}: {why}")]
pub struct DeviceArgError {
    /// `--disk` or `--passthrough`.
    pub what: &'static str,
    /// The argument.
    pub arg: String,
    /// What is wrong.
    pub why: String,
}

/// Splits `PATH[,option]...` into the path and its options.
fn path_and_options<'a>(
    what: &'static str,
    s: &'a str,
) -> Result<(PathBuf, std::str::Split<'a, char>), DeviceArgError> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or("");
    if path.is_empty() {
        return Err(DeviceArgError {
            what,
            arg: s.to_string(),
            why: "no path".into(),
        });
    }
    Ok((PathBuf::from(path), parts))
}

/// Parses `--disk PATH[,size=64M][,emulated|pv][,readonly]`: a PV block device (or an
/// emulated one) over a raw image, created with `size` bytes if missing.
pub fn parse_disk(s: &str) -> Result<DeviceSpec, DeviceArgError> {
    let err = |why: String| DeviceArgError {
        what: "--disk",
        arg: s.to_string(),
        why,
    };
    let (path, opts) = path_and_options("--disk", s)?;
    let mut spec = DiskSpec {
        path,
        create_size: None,
        readonly: false,
    };
    let mut emulated = false;
    for o in opts {
        match o {
            "emulated" => emulated = true,
            "pv" => emulated = false,
            "readonly" | "ro" => spec.readonly = true,
            _ => match o.strip_prefix("size=") {
                Some(v) => spec.create_size = Some(parse_size(v).map_err(|e| err(e.to_string()))?),
                None => {
                    return Err(err(format!(
                        "unknown option {o:?} (use size=N, emulated, pv, readonly)"
                    )))
                }
            },
        }
    }
    Ok(if emulated {
        DeviceSpec::EmuBlock(spec)
    } else {
        DeviceSpec::PvBlock(spec)
    })
}

/// Parses `--passthrough PATH,size=2M[,create]`: a passthrough region of `size` bytes
/// of the file (created if missing with `create`).
pub fn parse_passthrough(s: &str) -> Result<RegionSpec, DeviceArgError> {
    let err = |why: String| DeviceArgError {
        what: "--passthrough",
        arg: s.to_string(),
        why,
    };
    let (path, opts) = path_and_options("--passthrough", s)?;
    let mut size = None;
    let mut create = false;
    for o in opts {
        match o {
            "create" => create = true,
            _ => match o.strip_prefix("size=") {
                Some(v) => size = Some(parse_size(v).map_err(|e| err(e.to_string()))?),
                None => return Err(err(format!("unknown option {o:?} (use size=N, create)"))),
            },
        }
    }
    let size = size.ok_or_else(|| err("no size (add ,size=2M for example)".into()))?;
    Ok(RegionSpec { path, size, create })
}

/// Parses `--console-input FILE|-` (`-` is standard input).
pub fn parse_console_input(s: &str) -> Result<ConsoleInput, DeviceArgError> {
    match s {
        "" => Err(DeviceArgError {
            what: "--console-input",
            arg: s.to_string(),
            why: "empty path".into(),
        }),
        "-" => Ok(ConsoleInput::Stdin),
        p => Ok(ConsoleInput::File(PathBuf::from(p))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn device_arguments() {
        let disk = |p: &str, size, readonly| DiskSpec {
            path: p.into(),
            create_size: size,
            readonly,
        };
        assert_eq!(
            parse_disk("a.img"),
            Ok(DeviceSpec::PvBlock(disk("a.img", None, false)))
        );
        assert_eq!(
            parse_disk("/x/b.img,size=64M,emulated,readonly"),
            Ok(DeviceSpec::EmuBlock(disk("/x/b.img", Some(64 << 20), true)))
        );
        assert_eq!(
            parse_disk("c.img,emulated,pv,ro"),
            Ok(DeviceSpec::PvBlock(disk("c.img", None, true)))
        );
        assert!(parse_disk("").unwrap_err().to_string().contains("no path"));
        assert!(parse_disk("a,size=12X")
            .unwrap_err()
            .to_string()
            .contains("invalid size \"12X\""));
        assert!(parse_disk("a,fast")
            .unwrap_err()
            .to_string()
            .contains("unknown option \"fast\""));
        assert_eq!(
            parse_passthrough("r.bin,size=2M,create"),
            Ok(RegionSpec {
                path: "r.bin".into(),
                size: 2 << 20,
                create: true
            })
        );
        assert!(parse_passthrough("r.bin")
            .unwrap_err()
            .to_string()
            .contains("no size"));
        assert!(parse_passthrough("r.bin,size=2M,x").is_err());
        assert_eq!(parse_console_input("-"), Ok(ConsoleInput::Stdin));
        assert_eq!(
            parse_console_input("in.txt"),
            Ok(ConsoleInput::File("in.txt".into()))
        );
        assert!(parse_console_input("").is_err());
    }
}
