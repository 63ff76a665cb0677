//! What a restored machine has changed in its RAM since its restore.
//!
//! A restored machine maps its snapshot's RAM file privately: a page the guest (or a device)
//! has written since is the process's own anonymous copy, and every other page still reads
//! from the file. The kernel says which is which, page by page, in `/proc/<pid>/pagemap`: a
//! present page that is not a file page, or a page in swap, has been written. So the RAM of a
//! restored machine is its snapshot's file plus those pages, and a capture needs to copy only
//! them (read through `/proc/<pid>/mem` with the guest paused).
//!
//! Everything read here is the kernel's (`maps`, `pagemap`, `mem`); nothing is a path or a
//! file the machine's side can write. The mapping is found by the RAM file's device and inode,
//! never by its name.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};

/// The page size the kernel tracks the mapping in.
pub const PAGE: u64 = 4096;

/// Runs of changed pages: `(first page, pages)`, in order, not touching.
pub type Runs = Vec<(u64, u64)>;

/// Total pages of `runs`.
pub fn pages(runs: &Runs) -> u64 {
    runs.iter().map(|(_, n)| n).sum()
}

/// Where process `pid` maps `file` (from its start, at least `bytes` long): the mapping's
/// address, found in `/proc/<pid>/maps` by the file's device and inode.
pub fn mapping_of(pid: u32, file: &File, bytes: u64) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    let (major, minor) = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
    let maps = File::open(format!("/proc/{pid}/maps"))?;
    for line in BufReader::new(maps).lines() {
        let line = line?;
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(_perms), Some(offset), Some(dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let Some((dmaj, dmin)) = dev.split_once(':') else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        let (Some(start), Some(end), Some(offset), Some(dmaj), Some(dmin)) =
            (hex(start), hex(end), hex(offset), hex(dmaj), hex(dmin))
        else {
            continue;
        };
        if inode.parse::<u64>().ok() == Some(meta.ino())
            && dmaj == u64::from(major)
            && dmin == u64::from(minor)
            && offset == 0
            && end.saturating_sub(start) >= bytes
        {
            return Ok(start);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("process {pid} does not map the RAM file (inode {})", meta.ino()),
    ))
}

const PRESENT: u64 = 1 << 63;
const SOFT_DIRTY: u64 = 1 << 55;
const SWAPPED: u64 = 1 << 62;
const FILE_PAGE: u64 = 1 << 61;

/// Process `pid`'s pagemap entries for the mapping at `addr`, `bytes` long: one per page.
pub fn entries(pid: u32, addr: u64, bytes: u64) -> std::io::Result<Vec<u64>> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let total = bytes.div_ceil(PAGE);
    let mut out = Vec::with_capacity(total as usize);
    let mut buf = vec![0u8; 8 * 65536];
    let mut page = 0;
    while page < total {
        let n = (total - page).min(65536);
        let want = (n * 8) as usize;
        let got = read_full(&pagemap, &mut buf[..want], (addr / PAGE + page) * 8)?;
        if got < want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("pagemap of process {pid} ended at page {}", page + got as u64 / 8),
            ));
        }
        out.extend(
            buf[..want]
                .chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes"))),
        );
        page += n;
    }
    Ok(out)
}

/// The runs of pages whose entry (and index) `pick` takes.
pub fn runs_where(entries: &[u64], pick: impl Fn(usize, u64) -> bool) -> Runs {
    let mut runs: Runs = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if pick(i, e) {
            let p = i as u64;
            match runs.last_mut() {
                Some((first, len)) if *first + *len == p => *len += 1,
                _ => runs.push((p, 1)),
            }
        }
    }
    runs
}

/// Whether a pagemap entry is a page of the process's own (written since the mapping was
/// made), as opposed to one read from the file or never touched.
pub fn is_written(entry: u64) -> bool {
    (entry & PRESENT != 0 && entry & FILE_PAGE == 0) || entry & SWAPPED != 0
}

/// Whether a page has been written since the soft-dirty bits were last cleared.
pub fn is_soft_dirty(entry: u64) -> bool {
    entry & SOFT_DIRTY != 0
}

/// Clears process `pid`'s soft-dirty bits: from here on, a page it writes shows as soft-dirty.
pub fn clear_soft_dirty(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"4")
}

/// Whether this kernel tracks soft-dirty pages (tried once on a page of this process's own).
pub fn soft_dirty_works() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let mut page = vec![1u8; 2 * PAGE as usize];
        let addr = page.as_ptr() as u64;
        let aligned = addr.div_ceil(PAGE) * PAGE;
        let me = std::process::id();
        let entry = |a: u64| entries(me, a, PAGE).ok().and_then(|e| e.first().copied());
        if clear_soft_dirty(me).is_err() {
            return false;
        }
        let cleared = entry(aligned).is_some_and(|e| !is_soft_dirty(e));
        let i = (aligned - addr) as usize;
        // SAFETY: a volatile write inside the vector this function owns.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr().add(i), 2) };
        let dirtied = entry(aligned).is_some_and(is_soft_dirty);
        std::hint::black_box(&page);
        cleared && dirtied
    })
}

/// Punches `runs` out of `out` (pages that are no longer the process's own: they read as the
/// base again).
pub fn punch(out: &File, runs: &Runs) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    for &(first, len) in runs {
        fallocate(
            out,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            first * PAGE,
            len * PAGE,
        )?;
    }
    Ok(())
}

/// The pages of process `pid`'s private file mapping at `addr` (`bytes` long) that it has
/// written, as runs.
pub fn written_pages(pid: u32, addr: u64, bytes: u64) -> std::io::Result<Runs> {
    Ok(runs_where(&entries(pid, addr, bytes)?, |_, e| is_written(e)))
}

/// Copies `runs` of process `pid`'s memory at `addr` into `out`, each page at its offset in
/// the mapping (the rest of `out` stays a hole). Returns the bytes copied.
pub fn copy_pages(pid: u32, addr: u64, runs: &Runs, out: &File) -> std::io::Result<u64> {
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for &(first, len) in runs {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64 / PAGE);
            let bytes = (n * PAGE) as usize;
            let offset = (first + done) * PAGE;
            let got = read_full(&mem, &mut buf[..bytes], addr + offset)?;
            if got < bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("process {pid}'s memory could not be read at page {}", first + done),
                ));
            }
            out.write_all_at(&buf[..bytes], offset)?;
            copied += bytes as u64;
            done += n;
        }
    }
    Ok(copied)
}

/// Writes the pages `changes` holds (its data, page by page; its holes are pages left as the
/// base has them) into process `pid`'s mapping at `addr`: a machine restored from its base's
/// RAM file then has the changed pages as its own. Returns the bytes written.
pub fn write_pages(pid: u32, addr: u64, changes: &File, bytes: u64) -> std::io::Result<u64> {
    let mem = File::options().write(true).open(format!("/proc/{pid}/mem"))?;
    copy_data(changes, bytes, |data, at| mem.write_all_at(data, addr + at))
}

/// Makes `out` the RAM the changes describe: `base` (holes kept as holes) with `runs` of
/// `changes` over it, `bytes` long.
pub fn apply(base: &File, changes: &File, runs: &Runs, out: &File, bytes: u64) -> std::io::Result<()> {
    out.set_len(bytes)?;
    copy_data(base, bytes, |data, at| out.write_all_at(data, at))?;
    let mut buf = vec![0u8; 1 << 20];
    for &(first, len) in runs {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64 / PAGE);
            let bytes = (n * PAGE) as usize;
            let offset = (first + done) * PAGE;
            let got = read_full(changes, &mut buf[..bytes], offset)?;
            // A changed page the changes file holds as a hole (or past its end) is zeros.
            buf[got..bytes].fill(0);
            out.write_all_at(&buf[..bytes], offset)?;
            done += n;
        }
    }
    Ok(())
}

/// Hands `put` the data of `from` (its first `bytes`), range by range in pieces of at most a
/// MiB, with each piece's offset; holes are skipped. Returns the bytes handed over.
fn copy_data(from: &File, bytes: u64, mut put: impl FnMut(&[u8], u64) -> std::io::Result<()>) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    let mut at = 0;
    while let Some((start, end)) = next_data(from, at, bytes)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let got = read_full(from, &mut buf[..n], pos)?;
            if got == 0 {
                break;
            }
            put(&buf[..got], pos)?;
            copied += got as u64;
            pos += got as u64;
        }
        at = end;
    }
    Ok(copied)
}

/// The next range of data in `f` at or after `from` (and before `end`).
fn next_data(f: &File, from: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let start = match seek(f, SeekFrom::Data(from)) {
        Ok(s) => s,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if start >= end {
        return Ok(None);
    }
    let stop = seek(f, SeekFrom::Hole(start))?;
    Ok(Some((start, stop.min(end))))
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private mapping of a file in this very process: pages written show as written, pages
    /// only read or never touched do not.
    #[test]
    fn written_pages_of_a_private_file_mapping_are_found_and_copied() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let pages_n = 64u64;
        let mut f = File::create(&path).unwrap();
        for p in 0..pages_n {
            f.write_all(&vec![p as u8; PAGE as usize]).unwrap();
        }
        drop(f);
        let file = File::open(&path).unwrap();
        let len = (pages_n * PAGE) as usize;
        // SAFETY: a fresh private mapping of a file this test made, unmapped at the end.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
                &file,
                0,
            )
            .unwrap()
        } as *mut u8;
        // SAFETY: every offset is inside the mapping.
        unsafe {
            let _ = std::ptr::read_volatile(ptr.add(PAGE as usize)); // read only
            for p in [3u64, 4, 5, 10, 63] {
                std::ptr::write_volatile(ptr.add((p * PAGE) as usize + 7), 0xAB);
            }
        }
        let pid = std::process::id();
        let addr = mapping_of(pid, &file, pages_n * PAGE).unwrap();
        assert_eq!(addr, ptr as u64);
        let runs = written_pages(pid, addr, pages_n * PAGE).unwrap();
        assert_eq!(runs, vec![(3, 3), (10, 1), (63, 1)]);
        assert_eq!(pages(&runs), 5);

        let changes_path = dir.path().join("changes");
        let changes = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&changes_path)
            .unwrap();
        changes.set_len(pages_n * PAGE).unwrap();
        assert_eq!(copy_pages(pid, addr, &runs, &changes).unwrap(), 5 * PAGE);
        let whole = dir.path().join("whole");
        let out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&whole)
            .unwrap();
        apply(&file, &changes, &runs, &out, pages_n * PAGE).unwrap();
        let bytes = std::fs::read(&whole).unwrap();
        // SAFETY: the mapping is still there; it is unmapped right after.
        let live = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        assert_eq!(bytes, live, "the base with the changes over it is the process's memory");
        assert_eq!(bytes[(3 * PAGE) as usize + 7], 0xAB);
        assert_eq!(bytes[(2 * PAGE) as usize + 7], 2);
        // SAFETY: unmapping the mapping made above.
        unsafe { rustix::mm::munmap(ptr.cast(), len).unwrap() };

        // A fresh private mapping of the base, with the changes written in: the same memory.
        // SAFETY: as above, a new private mapping of the test's file.
        let fresh = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
                &file,
                0,
            )
            .unwrap()
        } as *mut u8;
        assert_eq!(
            write_pages(pid, fresh as u64, &changes, pages_n * PAGE).unwrap(),
            5 * PAGE
        );
        // SAFETY: reading the mapping just made, then unmapping it.
        let after = unsafe { std::slice::from_raw_parts(fresh, len) }.to_vec();
        assert_eq!(after, live, "the base's mapping with the changes written in");
        assert_eq!(written_pages(pid, fresh as u64, pages_n * PAGE).unwrap(), runs);
        // SAFETY: unmapping the second mapping, read above and not used again.
        unsafe { rustix::mm::munmap(fresh.cast(), len).unwrap() };
    }

    #[test]
    fn a_file_the_process_does_not_map_is_named_as_not_mapped() {
        let f = tempfile::tempfile().unwrap();
        let e = mapping_of(std::process::id(), &f, 4096).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(e.to_string().contains("does not map the RAM file"), "{e}");
    }
}
