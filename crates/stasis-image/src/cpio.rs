//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.

pub struct Writer {
    out: Vec<u8>,
    ino: u32,
}

impl Writer {
    pub fn new() -> Self {
        Writer {
            out: Vec::new(),
            ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) {
        self.entry(path, 0o040000 | perm, b"");
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, 0o100000 | perm, data);
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the same inputs give the same bytes
            data.len() as u32,
            0,
            0,
            0,
            0,
            path.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut w = Writer::new();
        w.dir("modules", 0o755);
        w.file("init", 0o755, b"abc");
        let bytes = w.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The second header starts on a 4-byte boundary right after "modules\0" + padding.
        let second = 110 + "modules\0".len();
        let second = second.div_ceil(4) * 4;
        assert_eq!(&bytes[second..second + 6], b"070701");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        let data_at = bytes.windows(5).position(|w| w == b"init\0").unwrap() + 5;
        let data_at = data_at.div_ceil(4) * 4;
        assert_eq!(&bytes[data_at..data_at + 3], b"abc");
    }
}
