//! Reading the files a user names (prompts, images, cases, profiles, models): only regular files
//! — a FIFO would block forever, `/dev/zero` never ends — and never more than a stated bound, so
//! bad input is one clear error instead of a hang or an exhausted memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Opens `path` for reading if it is a regular file (symlinks followed); returns it and its size.
///
/// # Errors
/// `NotFound`, `NotRegularFile` (directories, FIFOs, devices, sockets) or `Io`.
pub fn open_regular(path: &Path, what: &'static str) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| io_error(what, path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file (a pipe, device or socket)" };
        return Err(Error::NotRegularFile { what, path: path.to_owned(), kind });
    }
    let file = File::open(path).map_err(|e| io_error(what, path, e))?;
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `max` bytes.
///
/// # Errors
/// As [`open_regular`], and `TooLarge` past `max` (also when the file grows while read).
pub fn read_bounded(path: &Path, what: &'static str, max: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, what)?;
    let too_large = |size| Error::TooLarge { what, path: path.to_owned(), size, max };
    if len > max {
        return Err(too_large(len));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut buf).map_err(|e| io_error(what, path, e))?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

/// Reads a regular UTF-8 text file of at most `max` bytes.
///
/// # Errors
/// As [`read_bounded`], and `Io` (invalid data) when it is not UTF-8.
pub fn read_text(path: &Path, what: &'static str, max: u64) -> Result<String> {
    let bytes = read_bounded(path, what, max)?;
    String::from_utf8(bytes).map_err(|e| Error::Io {
        what,
        path: path.to_owned(),
        cause: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())),
    })
}

/// `NotFound` for a missing file, `Io` otherwise.
pub fn io_error(what: &'static str, path: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { what, path: path.to_owned() },
        _ => Error::Io { what, path: path.to_owned(), cause: e },
    }
}

/// `s` as one line: control characters escaped (`\n`, `\u{0}`) — for messages that quote names
/// from a file.
#[must_use]
pub fn one_line(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_debug().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// Size bounds for what csp-llava reads.
pub mod limits {
    /// A prompt file (`-f`), a chat template file.
    pub const TEXT: u64 = 16 << 20;
    /// An eval/calibrate case file, a PrefixKV profile, a `--cases-out` file being resumed.
    pub const JSON: u64 = 256 << 20;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "hello").unwrap();
        assert_eq!(read_text(&f, "prompt file", 5).unwrap(), "hello");
        assert!(matches!(read_text(&f, "prompt file", 4), Err(Error::TooLarge { size: 5, max: 4, .. })));
        assert!(matches!(read_bounded(dir.path(), "prompt file", 9), Err(Error::NotRegularFile { .. })));
        assert!(matches!(read_bounded(Path::new("/dev/zero"), "image", 9), Err(Error::NotRegularFile { .. })));
        assert!(matches!(read_bounded(&dir.path().join("none"), "image", 9), Err(Error::NotFound { .. })));
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        let e = read_text(&f, "prompt file", 9).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
            // must return at once, not block opening the pipe
            assert!(matches!(read_bounded(&fifo, "image", 9), Err(Error::NotRegularFile { .. })));
        }
    }
}
