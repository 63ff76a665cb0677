//! A machine's console as the platform keeps it: what the guest printed since its QEMU
//! started, capped (the last [`crate::vm::LOG_CAP_BYTES`] or so: `console.log` and, once cut,
//! the half before in `console.log.1`), each byte at a stable position counted from the start
//! (`console.log.base` says where the current file begins). Readers ask from a position and
//! get what is still kept from there; what was cut away is gone, and they are told where the
//! kept part begins. All three files are the platform's, in the machine's control directory;
//! QEMU holds only a descriptor of `console.log`, opened for appending.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Cuts and reads of consoles one at a time in this process (a read between a cut and the
/// new base would misplace what it read).
static CUTS: Mutex<()> = Mutex::new(());

fn rotated(console: &Path) -> PathBuf {
    with_suffix(console, ".1")
}

fn base_file(console: &Path) -> PathBuf {
    with_suffix(console, ".base")
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn base_of(console: &Path) -> u64 {
    crate::untrusted::read_small_file(&base_file(console))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn set_base(console: &Path, base: u64) -> io::Result<()> {
    let path = base_file(console);
    let tmp = with_suffix(&path, ".tmp");
    std::fs::write(&tmp, format!("{base}\n"))?;
    std::fs::rename(&tmp, &path)
}

/// A new QEMU starts a new console (its file was just emptied): nothing kept from before.
pub(crate) fn restart(console: &Path) {
    let _cuts = CUTS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = std::fs::remove_file(rotated(console));
    let _ = set_base(console, 0);
}

/// Cuts the console back once past `cap` (see [`crate::untrusted::rotate_log`]), keeping the
/// positions of what stays.
pub(crate) fn cut(console: &Path, cap: u64) -> io::Result<()> {
    let _cuts = CUTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cut) = crate::untrusted::rotate_log(console, cap)? {
        set_base(console, base_of(console) + cut)?;
    }
    Ok(())
}

/// What a read of the console found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleRead {
    /// The position of the oldest byte still kept.
    pub first: u64,
    /// The position of `bytes[0]`.
    pub start: u64,
    pub bytes: Vec<u8>,
    /// The position after the newest byte (where the next read goes on from).
    pub end: u64,
}

/// Up to `max` bytes of the console from position `from` (or from the oldest kept, if
/// that is later); with no `from`, its last `max` bytes.
pub fn read(console: &Path, from: Option<u64>, max: usize) -> io::Result<ConsoleRead> {
    let _cuts = CUTS.lock().unwrap_or_else(|p| p.into_inner());
    let base = base_of(console);
    let main = open(console)?;
    let old = open(&rotated(console)).ok().flatten();
    let main_len = main.as_ref().map_or(0, |f| f.metadata().map_or(0, |m| m.len()));
    let old_len = old
        .as_ref()
        .map_or(0, |f| f.metadata().map_or(0, |m| m.len()))
        .min(base);
    let first = base - old_len;
    let end = base + main_len;
    let start = match from {
        Some(at) => at.clamp(first, end),
        None => end.saturating_sub(max as u64).max(first),
    };
    let stop = end.min(start + max as u64);
    let mut bytes = Vec::with_capacity((stop - start) as usize);
    if start < base {
        if let Some(f) = &old {
            let upto = stop.min(base);
            let mut buf = vec![0u8; (upto - start) as usize];
            let n = f.read_at(&mut buf, start - first)?;
            buf.truncate(n);
            bytes.extend(buf);
        }
    }
    if stop > base {
        if let Some(f) = &main {
            let from_main = start.max(base);
            let mut buf = vec![0u8; (stop - from_main) as usize];
            let n = f.read_at(&mut buf, from_main - base)?;
            buf.truncate(n);
            bytes.extend(buf);
        }
    }
    let end = start + bytes.len() as u64;
    Ok(ConsoleRead {
        first,
        start,
        bytes,
        end,
    })
}

/// The file, or none if there is none yet (a machine that never started).
fn open(path: &Path) -> io::Result<Option<std::fs::File>> {
    match crate::untrusted::open_regular(path, false) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_stay_put_across_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .unwrap();
        restart(&console);
        use std::io::Write;
        let mut all = Vec::new();
        for i in 0..300u32 {
            let line = format!("line {i:04}\n");
            writer.write_all(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
            // A cap of 1000 bytes: cut many times over.
            cut(&console, 1000).unwrap();
        }
        let whole = all.len() as u64;
        let r = read(&console, None, 1 << 20).unwrap();
        assert_eq!(r.end, whole, "positions count everything ever printed");
        assert_eq!(
            r.bytes,
            all[r.start as usize..],
            "what is kept is what was printed there"
        );
        assert!(r.first > 0 && r.first == r.start, "the start was cut away");
        // From a position: exactly the bytes there, also across the two files.
        let at = r.first + 3;
        let part = read(&console, Some(at), 700).unwrap();
        assert_eq!(part.start, at);
        assert_eq!(part.bytes, all[at as usize..(at as usize + part.bytes.len())]);
        // From before what is kept: from the oldest kept.
        assert_eq!(read(&console, Some(0), 10).unwrap().start, r.first);
        // From the end: nothing yet.
        let none = read(&console, Some(whole), 10).unwrap();
        assert_eq!((none.start, none.bytes.len(), none.end), (whole, 0, whole));
        // A new QEMU: a new console.
        writer.set_len(0).unwrap();
        restart(&console);
        assert_eq!(read(&console, None, 100).unwrap().end, 0);
        // No console yet at all: empty.
        assert_eq!(read(&dir.path().join("none.log"), None, 10).unwrap().end, 0);
    }
}
