//! Files in a machine's directories that its QEMU (confined, possibly taken over) can reach:
//! opened without following a link or blocking on a FIFO, only if regular, and read only as
//! much as is needed, whoever could have put them there.

use std::path::Path;

/// How much of a log's end is read for its last lines.
const TAIL_BYTES: u64 = 64 * 1024;

/// A small file (a pid), read without following a link, blocking on a FIFO or reading more
/// than a few bytes, whoever could have put it there.
pub(crate) fn read_small_file(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.file_type().is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(64).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Opens a file for reading (or writing) without following a link or blocking on a FIFO, and
/// only if it is a regular file (the logs are the platform's own, in its control directory;
/// this is the second line of defence).
pub(crate) fn open_regular(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// The last `TAIL_BYTES` of a file (nothing if it cannot be read safely).
fn read_tail(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let Ok(f) = open_regular(path, false) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = vec![0u8; (len - start) as usize];
    match f.read_at(&mut buf, start) {
        Ok(n) => buf.truncate(n),
        Err(_) => buf.clear(),
    }
    buf
}

/// The last `n` lines of a log, across its rotation (`<log>.1`, then `<log>`).
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let mut bytes = read_tail(Path::new(&rotated));
    bytes.extend(read_tail(path));
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Once `path` passes `cap` bytes: its last `cap / 2` go to `<path>.1` and it starts again
/// empty. QEMU appends (`O_APPEND`), so it goes on writing at the new end.
/// Answers how many bytes the file had when cut (none: it was within `cap`).
pub(crate) fn rotate_log(path: &Path, cap: u64) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = open_regular(path, true)?;
    let len = f.metadata()?.len();
    if len <= cap {
        return Ok(None);
    }
    let keep = cap / 2;
    let mut tail = vec![0u8; keep as usize];
    let n = f.read_at(&mut tail, len - keep)?;
    tail.truncate(n);
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    let mut tmp = rotated.clone();
    tmp.push(".tmp");
    std::fs::write(&tmp, &tail)?;
    std::fs::rename(&tmp, &rotated)?;
    f.set_len(0)?;
    Ok(Some(len))
}
