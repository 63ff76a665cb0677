//! File operations for the host ([`FsOp`]): each one bounded (a chunk of a file, a listing of
//! at most [`MAX_LIST_ENTRIES`]), each failure told by its `errno` kind and the path.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use stasis_agent_proto::{FileMeta, FsErrorKind, FsOp, FsReply, FILE_CHUNK_BYTES, MAX_LIST_ENTRIES};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub fn run(op: FsOp) -> FsReply {
    match run_inner(op) {
        Ok(reply) => reply,
        Err(e) => e,
    }
}

/// A failure: its kind, and what was being done to which path.
fn failed(what: &str, path: &str, e: std::io::Error) -> FsReply {
    let kind = e.raw_os_error().map(FsErrorKind::of_errno).unwrap_or(match e.kind() {
        std::io::ErrorKind::NotFound => FsErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => FsErrorKind::PermissionDenied,
        std::io::ErrorKind::AlreadyExists => FsErrorKind::AlreadyExists,
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => FsErrorKind::Invalid,
        _ => FsErrorKind::Other,
    });
    FsReply::Failed {
        kind,
        message: format!("{what} {path}: {}", kind_text(kind, &e)),
    }
}

fn kind_text(kind: FsErrorKind, e: &std::io::Error) -> String {
    match kind {
        FsErrorKind::Other | FsErrorKind::Invalid => e.to_string(),
        k => k.phrase().to_string(),
    }
}

fn refuse(kind: FsErrorKind, what: &str, path: &str) -> FsReply {
    FsReply::Failed {
        kind,
        message: format!("{what} {path}: {}", kind.phrase()),
    }
}

fn not_regular(what: &str, path: &str) -> FsReply {
    FsReply::Failed {
        kind: FsErrorKind::Invalid,
        message: format!("{what} {path}: not a regular file (a device, FIFO or socket)"),
    }
}

fn absolute(path: &str) -> Result<&Path, FsReply> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(Path::new(path))
    } else {
        Err(FsReply::Failed {
            kind: FsErrorKind::Invalid,
            message: format!("{path:?} is not an absolute path"),
        })
    }
}

pub fn meta_of(path: &Path) -> std::io::Result<FileMeta> {
    let m = std::fs::symlink_metadata(path)?;
    let is_symlink = m.file_type().is_symlink();
    Ok(FileMeta {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: path.to_string_lossy().into_owned(),
        size: m.len(),
        mode: m.mode(),
        is_dir: m.is_dir(),
        is_symlink,
        symlink_target: is_symlink
            .then(|| std::fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
        modified_ms: Some(m.mtime() * 1000 + m.mtime_nsec() / 1_000_000),
    })
}

fn run_inner(op: FsOp) -> Result<FsReply, FsReply> {
    match op {
        FsOp::Stat { path } => {
            let p = absolute(&path)?;
            meta_of(p).map(FsReply::Stat).map_err(|e| failed("stat", &path, e))
        }
        FsOp::List { path } => {
            let p = absolute(&path)?;
            let dir = std::fs::read_dir(p).map_err(|e| failed("listing", &path, e))?;
            let mut entries = Vec::new();
            let mut truncated = false;
            for entry in dir {
                let entry = entry.map_err(|e| failed("listing", &path, e))?;
                if entries.len() == MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                // An entry removed meanwhile is simply not listed.
                if let Ok(meta) = meta_of(&entry.path()) {
                    entries.push(meta);
                }
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(FsReply::Entries { entries, truncated })
        }
        FsOp::Mkdir { path, recursive, mode } => {
            let p = absolute(&path)?;
            if recursive && p.is_dir() {
                return Ok(FsReply::Done);
            }
            let made = if recursive {
                std::fs::create_dir_all(p)
            } else {
                std::fs::create_dir(p)
            };
            made.map_err(|e| failed("making directory", &path, e))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| failed("setting the mode of", &path, e))?;
            Ok(FsReply::Done)
        }
        FsOp::Rename { from, to } => {
            absolute(&from)?;
            absolute(&to)?;
            std::fs::rename(&from, &to).map_err(|e| failed("renaming", &from, e))?;
            Ok(FsReply::Done)
        }
        FsOp::Copy { from, to, recursive } => {
            let src = absolute(&from)?;
            let dst = absolute(&to)?;
            let m = std::fs::symlink_metadata(src).map_err(|e| failed("copying", &from, e))?;
            if m.is_dir() && !recursive {
                return Err(refuse(FsErrorKind::IsADirectory, "copying (without recursive)", &from));
            }
            if m.is_dir() && dst.starts_with(src) {
                return Err(FsReply::Failed {
                    kind: FsErrorKind::Invalid,
                    message: format!("copying {from} into itself ({to})"),
                });
            }
            copy_tree(src, dst)?;
            Ok(FsReply::Done)
        }
        FsOp::Chmod { path, mode } => {
            let p = absolute(&path)?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| failed("changing the mode of", &path, e))?;
            Ok(FsReply::Done)
        }
        FsOp::Remove { path, recursive } => {
            let p = absolute(&path)?;
            if p == Path::new("/") {
                return Err(FsReply::Failed {
                    kind: FsErrorKind::Invalid,
                    message: "removing / is refused".into(),
                });
            }
            let m = std::fs::symlink_metadata(p).map_err(|e| failed("removing", &path, e))?;
            let removed = match (m.is_dir(), recursive) {
                (true, true) => std::fs::remove_dir_all(p),
                (true, false) => std::fs::remove_dir(p),
                (false, _) => std::fs::remove_file(p),
            };
            removed.map_err(|e| failed("removing", &path, e))?;
            Ok(FsReply::Done)
        }
        FsOp::Read { path, offset, len } => {
            let p = absolute(&path)?;
            // Not blocking on a FIFO: only regular files are read.
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
                .map_err(|e| failed("reading", &path, e))?;
            let m = f.metadata().map_err(|e| failed("reading", &path, e))?;
            if m.is_dir() {
                return Err(refuse(FsErrorKind::IsADirectory, "reading", &path));
            }
            if !m.is_file() {
                return Err(not_regular("reading", &path));
            }
            let want = (len as usize).min(FILE_CHUNK_BYTES);
            let mut buf = Vec::with_capacity(want);
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| failed("reading", &path, e))?;
            (&mut f)
                .take(want as u64)
                .read_to_end(&mut buf)
                .map_err(|e| failed("reading", &path, e))?;
            let size = m.len();
            Ok(FsReply::Data {
                eof: buf.len() < want || offset + buf.len() as u64 >= size,
                data: B64.encode(&buf),
                size,
            })
        }
        FsOp::Write {
            path,
            offset,
            data,
            truncate,
        } => {
            let p = absolute(&path)?;
            let bytes = B64.decode(data.as_bytes()).map_err(|e| FsReply::Failed {
                kind: FsErrorKind::Invalid,
                message: format!("writing {path}: the data is not base64 ({e})"),
            })?;
            if bytes.len() > FILE_CHUNK_BYTES {
                return Err(FsReply::Failed {
                    kind: FsErrorKind::Invalid,
                    message: format!("writing {path}: a chunk is at most {FILE_CHUNK_BYTES} bytes"),
                });
            }
            if let Some(parent) = p.parent() {
                if std::fs::symlink_metadata(parent).is_ok_and(|m| !m.is_dir()) && !parent.is_dir() {
                    return Err(refuse(FsErrorKind::NotADirectory, "writing", &path));
                }
                if !parent.is_dir() {
                    std::fs::create_dir_all(parent).map_err(|e| failed("making the directories of", &path, e))?;
                }
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NONBLOCK)
                .mode(0o644)
                .open(p)
                .map_err(|e| failed("writing", &path, e))?;
            if !f.metadata().map_err(|e| failed("writing", &path, e))?.is_file() {
                return Err(not_regular("writing", &path));
            }
            if truncate {
                f.set_len(offset).map_err(|e| failed("writing", &path, e))?;
            }
            f.write_all_at(&bytes, offset)
                .map_err(|e| failed("writing", &path, e))?;
            let size = f.metadata().map_err(|e| failed("writing", &path, e))?.len();
            Ok(FsReply::Written { size })
        }
    }
}

/// Copies `src` to `dst`: a file with its mode, a symlink as a link, a directory with all it
/// holds.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), FsReply> {
    let name = |p: &Path| p.to_string_lossy().into_owned();
    let m = std::fs::symlink_metadata(src).map_err(|e| failed("copying", &name(src), e))?;
    if m.file_type().is_symlink() {
        let target = std::fs::read_link(src).map_err(|e| failed("copying", &name(src), e))?;
        std::os::unix::fs::symlink(target, dst).map_err(|e| failed("copying to", &name(dst), e))?;
    } else if m.is_dir() {
        match std::fs::create_dir(dst) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dst.is_dir() => {}
            Err(e) => return Err(failed("copying to", &name(dst), e)),
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(|e| failed("copying to", &name(dst), e))?;
        for entry in std::fs::read_dir(src).map_err(|e| failed("copying", &name(src), e))? {
            let entry = entry.map_err(|e| failed("copying", &name(src), e))?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(src, dst).map_err(|e| failed("copying to", &name(dst), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn files_are_written_read_listed_copied_and_removed_with_errors_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a/b/c.bin");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        for (i, chunk) in bytes.chunks(1024).enumerate() {
            let r = run(FsOp::Write {
                path: s(&file),
                offset: (i * 1024) as u64,
                data: B64.encode(chunk),
                truncate: i == 0,
            });
            assert!(matches!(r, FsReply::Written { .. }), "{r:?}");
        }
        let mut back = Vec::new();
        let mut offset = 0;
        loop {
            match run(FsOp::Read {
                path: s(&file),
                offset,
                len: 1000,
            }) {
                FsReply::Data { data, size, eof } => {
                    assert_eq!(size, 3000);
                    let got = B64.decode(data).unwrap();
                    offset += got.len() as u64;
                    back.extend(got);
                    if eof {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, bytes);

        let FsReply::Entries { entries, truncated } = run(FsOp::List {
            path: s(&dir.path().join("a/b")),
        }) else {
            panic!()
        };
        assert_eq!(
            (entries.len(), entries[0].name.as_str(), entries[0].size, truncated),
            (1, "c.bin", 3000, false)
        );

        let copy = dir.path().join("copy");
        assert_eq!(
            run(FsOp::Copy {
                from: s(&dir.path().join("a")),
                to: s(&copy),
                recursive: false
            }),
            refuse(
                FsErrorKind::IsADirectory,
                "copying (without recursive)",
                &s(&dir.path().join("a"))
            )
        );
        assert_eq!(
            run(FsOp::Copy {
                from: s(&dir.path().join("a")),
                to: s(&copy),
                recursive: true
            }),
            FsReply::Done
        );
        assert_eq!(std::fs::read(copy.join("b/c.bin")).unwrap(), bytes);
        assert_eq!(
            run(FsOp::Chmod {
                path: s(&file),
                mode: 0o600
            }),
            FsReply::Done
        );
        let FsReply::Stat(m) = run(FsOp::Stat { path: s(&file) }) else {
            panic!()
        };
        assert_eq!(m.mode & 0o7777, 0o600);

        let kind = |r: FsReply| match r {
            FsReply::Failed { kind, message } => {
                assert!(message.contains('/'), "names the path: {message}");
                kind
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(run(FsOp::Stat {
                path: s(&dir.path().join("nope"))
            })),
            FsErrorKind::NotFound
        );
        assert_eq!(kind(run(FsOp::List { path: s(&file) })), FsErrorKind::NotADirectory);
        assert_eq!(
            kind(run(FsOp::Read {
                path: s(&dir.path().join("a")),
                offset: 0,
                len: 1
            })),
            FsErrorKind::IsADirectory
        );
        assert_eq!(
            kind(run(FsOp::Remove {
                path: s(&dir.path().join("a")),
                recursive: false
            })),
            FsErrorKind::NotEmpty
        );
        assert_eq!(
            kind(run(FsOp::Mkdir {
                path: s(&file),
                recursive: false,
                mode: 0o755
            })),
            FsErrorKind::AlreadyExists
        );
        assert!(matches!(
            run(FsOp::Stat { path: "relative".into() }),
            FsReply::Failed { kind: FsErrorKind::Invalid, message } if message.contains("\"relative\" is not an absolute path")
        ));
        assert_eq!(
            run(FsOp::Remove {
                path: s(&dir.path().join("a")),
                recursive: true
            }),
            FsReply::Done
        );
        assert!(!dir.path().join("a").exists());
        assert_eq!(
            run(FsOp::Rename {
                from: s(&copy),
                to: s(&dir.path().join("moved"))
            }),
            FsReply::Done
        );
        assert!(dir.path().join("moved/b/c.bin").exists());
    }
}
