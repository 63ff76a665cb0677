//! File operations ([`crate::Op::Fs`]): what the host asks of the guest's file system, one
//! bounded step at a time. File contents move in chunks of at most [`FILE_CHUNK_BYTES`]
//! (base64 in the frame), so neither end ever holds a whole file; a transfer is many reads or
//! writes at increasing offsets. A request resent (after a restore, or while slow) is answered
//! once: reads are simply run again, everything else is answered from the agent's memory.

use serde::{Deserialize, Serialize};

/// The first protocol version whose agent serves [`FsOp`]s.
pub const FILES_SINCE: u32 = 2;

/// Most bytes of a file one read or write carries.
pub const FILE_CHUNK_BYTES: usize = 1024 * 1024;

/// Most entries one listing answers with (a `List` of a larger directory says `truncated`).
pub const MAX_LIST_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fs", rename_all = "snake_case")]
pub enum FsOp {
    /// `lstat`: a symlink is described, not followed.
    Stat { path: String },
    /// A directory's entries, by name (each `lstat`ed).
    List { path: String },
    /// A directory (and with `recursive` its missing parents); `mode` is the new one's.
    Mkdir { path: String, recursive: bool, mode: u32 },
    /// `rename(2)`: replaces a file at `to`.
    Rename { from: String, to: String },
    /// A file's bytes and mode; a directory only with `recursive` (symlinks copied as links).
    Copy { from: String, to: String, recursive: bool },
    /// The permission bits (`mode & 0o7777`).
    Chmod { path: String, mode: u32 },
    /// A file or symlink; a directory if empty, or with `recursive` whatever it holds.
    Remove { path: String, recursive: bool },
    /// Up to `len` (at most [`FILE_CHUNK_BYTES`]) bytes from `offset` of a regular file.
    Read { path: String, offset: u64, len: u32 },
    /// `data` (base64) at `offset`, making the file (and its missing parent directories)
    /// when it does not exist; `truncate` first cuts it to `offset` bytes.
    Write {
        path: String,
        offset: u64,
        data: String,
        truncate: bool,
    },
}

impl FsOp {
    /// Whether it only reads, so that running it again (a request resent after its answer)
    /// changes nothing: the agent does not remember these answers, which can be large. A
    /// write's answer is remembered as any other's: run again after the upload was renamed
    /// into place, it would make the partial file anew.
    pub fn only_reads(&self) -> bool {
        matches!(self, FsOp::Stat { .. } | FsOp::List { .. } | FsOp::Read { .. })
    }
}

/// What one file or directory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: String,
    pub path: String,
    pub size: u64,
    /// The whole `st_mode` (type and permission bits).
    pub mode: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
    #[serde(default)]
    pub symlink_target: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub modified_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fs", rename_all = "snake_case")]
pub enum FsReply {
    Stat(FileMeta),
    Entries {
        entries: Vec<FileMeta>,
        truncated: bool,
    },
    /// Bytes read (base64); `size` is the file's size when read, `eof` whether they end it.
    Data {
        data: String,
        size: u64,
        eof: bool,
    },
    /// The file's size after the write.
    Written {
        size: u64,
    },
    Done,
    Failed {
        kind: FsErrorKind,
        message: String,
    },
}

/// Why a file operation failed, as its `errno` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsErrorKind {
    NotFound,
    NotADirectory,
    IsADirectory,
    PermissionDenied,
    AlreadyExists,
    NotEmpty,
    NoSpace,
    /// Not a usable path or request (not absolute, too long, a loop of links, ...).
    Invalid,
    Other,
}

impl FsErrorKind {
    /// The kind of an `errno`.
    pub fn of_errno(errno: i32) -> FsErrorKind {
        // Linux's numbers (the agent runs on Linux; the proto crate has no libc).
        match errno {
            2 => FsErrorKind::NotFound,                        // ENOENT
            20 => FsErrorKind::NotADirectory,                  // ENOTDIR
            21 => FsErrorKind::IsADirectory,                   // EISDIR
            1 | 13 | 30 | 26 => FsErrorKind::PermissionDenied, // EPERM EACCES EROFS ETXTBSY
            17 => FsErrorKind::AlreadyExists,                  // EEXIST
            39 => FsErrorKind::NotEmpty,                       // ENOTEMPTY
            28 | 122 => FsErrorKind::NoSpace,                  // ENOSPC EDQUOT
            22 | 36 | 40 | 18 => FsErrorKind::Invalid,         // EINVAL ENAMETOOLONG ELOOP EXDEV
            _ => FsErrorKind::Other,
        }
    }

    /// A short phrase for messages: "no such file or directory", ...
    pub fn phrase(self) -> &'static str {
        match self {
            FsErrorKind::NotFound => "no such file or directory",
            FsErrorKind::NotADirectory => "not a directory",
            FsErrorKind::IsADirectory => "is a directory",
            FsErrorKind::PermissionDenied => "permission denied",
            FsErrorKind::AlreadyExists => "already exists",
            FsErrorKind::NotEmpty => "directory not empty",
            FsErrorKind::NoSpace => "no space left on the computer's disk",
            FsErrorKind::Invalid => "invalid path",
            FsErrorKind::Other => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Op, Reply, Request, Response};

    #[test]
    fn file_operations_round_trip_through_frames() {
        for op in [
            FsOp::Stat { path: "/a".into() },
            FsOp::Write {
                path: "/a b".into(),
                offset: u64::MAX >> 12,
                data: "aGk=".into(),
                truncate: true,
            },
            FsOp::Mkdir {
                path: "/d".into(),
                recursive: true,
                mode: 0o755,
            },
        ] {
            let line = encode(&Request {
                id: 7,
                op: Op::Fs(op.clone()),
            });
            let back: Request = decode(&line[..line.len() - 1]).unwrap();
            assert_eq!(back.op, Op::Fs(op));
        }
        let reply = Reply::Fs(FsReply::Failed {
            kind: FsErrorKind::NoSpace,
            message: "writing /x".into(),
        });
        let line = encode(&Response {
            id: 9,
            reply: reply.clone(),
        });
        let back: Response = decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back.reply, reply);
        let meta = FileMeta {
            name: "x".into(),
            path: "/x".into(),
            size: 3,
            mode: 0o100644,
            is_dir: false,
            is_symlink: false,
            symlink_target: None,
            modified_ms: Some(1),
        };
        let line = encode(&Response {
            id: 1,
            reply: Reply::Fs(FsReply::Stat(meta.clone())),
        });
        let back: Response = decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back.reply, Reply::Fs(FsReply::Stat(meta)));
        assert_eq!(FsErrorKind::of_errno(2), FsErrorKind::NotFound);
        assert_eq!(FsErrorKind::of_errno(28), FsErrorKind::NoSpace);
    }
}
