//! Sessions ([`crate::Op::Session`]): programs that run for as long as they like, with their
//! output streamed to the host and their input streamed from it (a spawn over a WebSocket, a
//! terminal, a background command).
//!
//! Output is pulled, not pushed: the agent keeps what a program writes in a bounded buffer per
//! stream, and the host asks for it with [`SessionOp::Read`], naming the offsets it already
//! has. Naming them is what lets a read be resent and run again without losing or repeating a
//! byte, and is the acknowledgement that lets the agent drop what the host holds. A read waits
//! (up to `wait_ms`) for something new, so output reaches the host as it is written, not a poll
//! later. Input carries its offset the same way ([`SessionOp::Write`]): a write resent after it
//! was done writes nothing twice.
//!
//! While the host reads, a program that writes faster than it is read waits (its pipe fills);
//! a background session instead keeps the newest [`SESSION_BUFFER_BYTES`] of each stream and
//! counts what it dropped. A session the host has not touched for [`ORPHAN_AFTER_MS`] (its
//! platform died, its client went without a word) is killed, unless it is a background one.

use serde::{Deserialize, Serialize};

/// The first protocol version whose agent serves [`SessionOp`]s.
pub const SESSIONS_SINCE: u32 = 3;

/// Most output bytes the agent holds per stream of one session.
pub const SESSION_BUFFER_BYTES: usize = 1024 * 1024;

/// Most output bytes of one stream a [`SessionReply::Output`] carries.
pub const SESSION_CHUNK_BYTES: usize = 256 * 1024;

/// Longest wait a read may ask for.
pub const MAX_READ_WAIT_MS: u32 = 10_000;

/// An attached session nobody has asked anything of for this long is killed.
pub const ORPHAN_AFTER_MS: u64 = 30_000;

/// Most sessions one agent keeps, whatever the host asks for.
pub const MAX_SESSIONS: u32 = 64;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size (one output stream, `stdout`); pipes otherwise.
    #[serde(default)]
    pub pty: Option<WinSize>,
    /// A background command: outlives its host's attention and keeps only its newest output.
    #[serde(default)]
    pub background: bool,
    /// Refuse ([`SessionErrorKind::TooMany`]) when this many sessions are live already.
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "session_op", rename_all = "snake_case")]
pub enum SessionOp {
    /// Start a program; answered with [`SessionReply::Started`].
    Start(SessionStart),
    /// Output past the given offsets (dropping what lies before them, unless a background
    /// session), waiting up to `wait_ms` for some; answered with [`SessionReply::Output`].
    Read {
        session: u64,
        stdout_from: u64,
        stderr_from: u64,
        wait_ms: u32,
    },
    /// Stdin bytes (base64) that start at byte `at` of everything written to this session.
    Write {
        session: u64,
        at: u64,
        data: String,
    },
    /// End of input: closes a pipe; on a terminal sends its end-of-file character.
    CloseStdin {
        session: u64,
    },
    Resize {
        session: u64,
        size: WinSize,
    },
    /// A signal (its Linux number) to the session's whole process group.
    Signal {
        session: u64,
        signal: i32,
    },
    /// Kill whatever still runs and forget the session.
    Close {
        session: u64,
    },
    /// Every session the agent keeps.
    List,
}

impl SessionOp {
    /// Reads and listings change nothing when run again (a read's offsets make it so), so the
    /// agent does not remember their answers.
    pub fn only_reads(&self) -> bool {
        matches!(self, SessionOp::Read { .. } | SessionOp::List)
    }
}

/// One session as [`SessionOp::List`] tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: u64,
    pub pid: i32,
    pub program: String,
    pub args: Vec<String>,
    pub pty: bool,
    pub background: bool,
    /// Milliseconds since the Unix epoch.
    pub started_ms: i64,
    pub exit_code: Option<i32>,
    /// Output bytes produced so far, per stream.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "session_reply", rename_all = "snake_case")]
pub enum SessionReply {
    Started {
        session: u64,
        pid: i32,
    },
    /// Output (base64) starting at byte `stdout_at` / `stderr_at` of each stream: the offset
    /// asked for, or later when a background session dropped the bytes between. `exit_code`
    /// is there once the program has ended and this output reaches the end of both streams.
    Output {
        stdout: String,
        stdout_at: u64,
        stderr: String,
        stderr_at: u64,
        exit_code: Option<i32>,
    },
    /// All of stdin up to byte `total` is written.
    Written {
        total: u64,
    },
    Sessions {
        sessions: Vec<SessionInfo>,
    },
    Done,
    Failed {
        kind: SessionErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionErrorKind {
    /// No session of that id (it ended and was closed, or never was).
    NotFound,
    /// As many sessions as the limit are live.
    TooMany,
    /// The program could not be started (not found, not executable, a bad working directory).
    Spawn,
    /// A malformed request (a write that leaves a gap, data that is not base64, ...).
    Invalid,
    /// The session's input is closed.
    InputClosed,
}

/// The Linux number of a signal given by name (`"SIGTERM"`, `"TERM"`, any case) or number.
pub fn signal_number(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match bare {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Op, Reply, Request, Response};

    #[test]
    fn session_frames_round_trip() {
        for op in [
            SessionOp::Start(SessionStart {
                program: "/bin/bash".into(),
                args: vec!["-l".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                pty: Some(WinSize { rows: 24, cols: 80 }),
                background: false,
                limit: 8,
            }),
            SessionOp::Read {
                session: 3,
                stdout_from: u64::MAX >> 12,
                stderr_from: 0,
                wait_ms: 5000,
            },
            SessionOp::Write {
                session: 3,
                at: 10,
                data: "aGk=".into(),
            },
            SessionOp::List,
        ] {
            let line = encode(&Request {
                id: 5,
                op: Op::Session(op.clone()),
            });
            let back: Request = decode(&line[..line.len() - 1]).unwrap();
            assert_eq!(back.op, Op::Session(op));
        }
        let reply = Reply::Session(SessionReply::Output {
            stdout: "aGk=".into(),
            stdout_at: 4,
            stderr: String::new(),
            stderr_at: 0,
            exit_code: Some(7),
        });
        let line = encode(&Response {
            id: 5,
            reply: reply.clone(),
        });
        let back: Response = decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back.reply, reply);
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number(" SIGINT "), Some(2));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("99"), None);
    }
}
