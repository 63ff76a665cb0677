//! The wire protocol between the host and the guest agent.
//!
//! Frames are single lines of JSON terminated by `\n` on a virtio-serial port. Every request
//! carries an `id` chosen by the host; every reply repeats it. The channel is not reliable across
//! snapshots (chardev buffers are not part of a snapshot, so a frame in flight can be lost, cut in
//! half or delivered twice after a restore), which shapes three rules both ends follow:
//!
//! * a line that does not parse is dropped, never fatal;
//! * the agent remembers recent request ids, so a repeated request is answered from memory
//!   (or with [`Reply::Running`] while it is still executing) instead of being run twice;
//! * the host matches replies to waiting callers by id and drops replies nobody waits for.

use serde::{Deserialize, Serialize};

mod fs;
mod line;
mod session;
pub use fs::{FileMeta, FsErrorKind, FsOp, FsReply, FILES_SINCE, FILE_CHUNK_BYTES, MAX_LIST_ENTRIES};
pub use line::{LineReader, Next, OVERSIZED_HEAD_BYTES};
pub use session::{
    signal_number, SessionErrorKind, SessionInfo, SessionOp, SessionReply, SessionStart, WinSize, MAX_READ_WAIT_MS,
    MAX_SESSIONS, ORPHAN_AFTER_MS, SESSIONS_SINCE, SESSION_BUFFER_BYTES, SESSION_CHUNK_BYTES,
};

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "stasis.agent";

/// Protocol version, reported by the agent in [`Reply::Hello`] and [`Reply::Pong`].
/// 2: file operations ([`Op::Fs`]). 3: sessions ([`Op::Session`]).
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame either end accepts; longer lines are skipped (by [`LineReader`], without
/// being held in memory). Room for [`EXEC_OUTPUT_BUDGET`] plus the rest of an exec reply.
pub const MAX_FRAME_BYTES: usize = EXEC_OUTPUT_BUDGET + 1024 * 1024;

/// Cap on captured stdout and on captured stderr of one command, each.
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024 * 1024;

/// Most bytes the JSON-encoded stdout and stderr of one exec reply may take together. JSON
/// writes text in at most two bytes a byte (`\n`, `\t`, `\"`, `\\`), so two full streams of
/// text always fit; only control bytes (`\u0001`: six bytes each) can need more, and those are
/// cut by [`fit_exec_output`].
pub const EXEC_OUTPUT_BUDGET: usize = 4 * MAX_OUTPUT_BYTES;

/// One request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// What the host asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness check; answered with [`Reply::Pong`].
    Ping,
    /// Run a program to completion and capture its output.
    Exec(ExecRequest),
    /// Flush file systems to the disk (before a stop or a disk snapshot).
    Sync,
    /// Make a restored guest a distinct machine: step the clock, reseed the kernel RNG,
    /// and optionally take a new hostname. Answered with [`Reply::Done`].
    Identity(IdentityRequest),
    /// A file operation (since [`FILES_SINCE`]); answered with [`Reply::Fs`].
    Fs(FsOp),
    /// A long-running program and its streams (since [`SESSIONS_SINCE`]); answered with
    /// [`Reply::Session`].
    Session(SessionOp),
}

impl Op {
    /// Whether running it again changes nothing, so the agent need not remember its answer
    /// (see [`FsOp::only_reads`], [`SessionOp::only_reads`]).
    pub fn only_reads(&self) -> bool {
        match self {
            Op::Fs(op) => op.only_reads(),
            Op::Session(op) => op.only_reads(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program to run (absolute path or looked up in `PATH`).
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables on top of the agent's defaults.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; `/root` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Data written to the program's stdin (then closed). Stdin is `/dev/null` when absent.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Wall-clock limit. On expiry the whole process group is killed and the exit code is 124.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRequest {
    /// Host wall clock, nanoseconds since the Unix epoch. (u64: a u128 cannot pass through
    /// the flattened, tagged encoding of requests.)
    pub unix_time_ns: u64,
    /// Fresh random bytes (hex) credited to the kernel entropy pool, followed by a reseed.
    pub entropy_hex: String,
    #[serde(default)]
    pub hostname: Option<String>,
    /// The clone's own `/etc/machine-id` (32 lowercase hex digits).
    #[serde(default)]
    pub machine_id: Option<String>,
}

/// One frame from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request this answers; `0` for unsolicited frames such as [`Reply::Hello`].
    pub id: u64,
    #[serde(flatten)]
    pub reply: Reply,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Sent once when the agent starts serving.
    Hello {
        version: u32,
        boot_id: String,
    },
    Pong {
        version: u32,
        boot_id: String,
        uptime_ms: u64,
    },
    Exec(ExecResult),
    Fs(FsReply),
    Session(SessionReply),
    /// The request completed and has nothing to report.
    Done,
    /// A repeated request whose first copy is still executing.
    Running,
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The command hit its timeout and was killed (exit code 124).
    pub timed_out: bool,
    /// Output was dropped: beyond [`MAX_OUTPUT_BYTES`] of a stream, or what did not fit the
    /// frame once JSON-escaped (see [`fit_exec_output`]).
    pub truncated: bool,
}

/// Exit code reported for a command killed by its timeout, as coreutils `timeout` does.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// How many bytes `s` takes inside a JSON string as serde_json writes it (quotes excluded).
pub fn json_escaped_len(s: &str) -> usize {
    s.bytes().map(escaped_byte_len).sum()
}

fn escaped_byte_len(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\n' | b'\t' | b'\r' | 0x08 | 0x0c => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// Cuts the longest prefix of `s` that ends on a char boundary and JSON-escapes to at most
/// `budget` bytes; returns whether anything was cut.
fn cut_to_escaped(s: &mut String, budget: usize) -> bool {
    let mut used = 0;
    let mut end = s.len();
    for (i, c) in s.char_indices() {
        let len = if c.is_ascii() {
            escaped_byte_len(c as u8)
        } else {
            c.len_utf8()
        };
        if used + len > budget {
            end = i;
            break;
        }
        used += len;
    }
    let cut = end < s.len();
    if cut {
        s.truncate(end);
        // The memory of what was cut goes back now, before the reply is encoded next to it.
        s.shrink_to_fit();
    }
    cut
}

/// Makes an exec result's output fit [`EXEC_OUTPUT_BUDGET`] once JSON-escaped, so its reply
/// always fits [`MAX_FRAME_BYTES`]: when the two streams need more, each keeps half the
/// budget, or what it needs if that is less, and the other gets the rest. Sets `truncated` if
/// anything was cut.
pub fn fit_exec_output(result: &mut ExecResult) {
    let out = json_escaped_len(&result.stdout);
    let err = json_escaped_len(&result.stderr);
    if out + err <= EXEC_OUTPUT_BUDGET {
        return;
    }
    let half = EXEC_OUTPUT_BUDGET / 2;
    let (out_budget, err_budget) = if out <= half {
        (out, EXEC_OUTPUT_BUDGET - out)
    } else if err <= half {
        (EXEC_OUTPUT_BUDGET - err, err)
    } else {
        (half, half)
    };
    let cut_out = cut_to_escaped(&mut result.stdout, out_budget);
    let cut_err = cut_to_escaped(&mut result.stderr, err_budget);
    result.truncated |= cut_out || cut_err;
}

/// The id of a frame from its first bytes: every frame [`encode`] writes starts with
/// `{"id":<digits>` (the id is the first field), which is enough to tell whose answer an
/// oversized line was without reading the rest.
pub fn frame_id(head: &[u8]) -> Option<u64> {
    let rest = trim_ascii(head).strip_prefix(b"{\"id\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // The digits must be followed by something: at the very end of the head, they may be
    // the start of a longer number.
    if digits == 0 || digits == rest.len() {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Serializes a frame as one line, `\n` included.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail: no maps with non-string keys, no
    // custom serializers.
    let mut line = serde_json::to_vec(frame).expect("protocol frames always serialize");
    line.push(b'\n');
    line
}

/// Parses one line (without its `\n`). A line cut by a snapshot can start in the middle of a
/// frame and run into the next one; in that case the last complete frame on the line is tried,
/// so a frame that merely follows garbage is not lost.
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Option<T> {
    let line = trim_ascii(line);
    if line.is_empty() || line.len() > MAX_FRAME_BYTES {
        return None;
    }
    if let Ok(frame) = serde_json::from_slice(line) {
        return Some(frame);
    }
    // Try from each later `{"id":` start, the marker every frame begins with.
    const START: &[u8] = b"{\"id\":";
    let mut from = 1;
    while let Some(pos) = find(&line[from..], START) {
        let candidate = &line[from + pos..];
        if let Ok(frame) = serde_json::from_slice(candidate) {
            return Some(frame);
        }
        from += pos + 1;
    }
    None
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() || *first == 0 {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() || *last == 0 {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_request(id: u64) -> Request {
        Request {
            id,
            op: Op::Exec(ExecRequest {
                program: "/bin/bash".into(),
                args: vec!["-c".into(), "echo {\"id\":1}".into()],
                env: vec![],
                cwd: None,
                stdin: None,
                timeout_ms: 1000,
            }),
        }
    }

    #[test]
    fn round_trips_every_frame_kind() {
        let req = exec_request(7);
        let line = encode(&req);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode::<Request>(&line), Some(req));

        let resp = Response {
            id: 7,
            reply: Reply::Exec(ExecResult {
                exit_code: 3,
                stdout: "a\nb".into(),
                stderr: String::new(),
                timed_out: false,
                truncated: false,
            }),
        };
        assert_eq!(decode::<Response>(&encode(&resp)), Some(resp));
        let running = Response {
            id: 9,
            reply: Reply::Running,
        };
        assert_eq!(decode::<Response>(&encode(&running)), Some(running));
    }

    #[test]
    fn identity_requests_decode() {
        let req = Request {
            id: 11,
            op: Op::Identity(IdentityRequest {
                unix_time_ns: 1_796_000_000_123_456_789,
                entropy_hex: "00ff".into(),
                hostname: Some("clone".into()),
                machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            }),
        };
        assert_eq!(decode::<Request>(&encode(&req)), Some(req));
    }

    #[test]
    fn garbage_lines_are_dropped() {
        assert_eq!(decode::<Request>(b""), None);
        assert_eq!(decode::<Request>(b"\0\0\0"), None);
        assert_eq!(decode::<Request>(b"{\"id\":3,\"op\":\"nope\"}"), None);
        assert_eq!(decode::<Request>(b"not json at all"), None);
    }

    #[test]
    fn a_frame_after_a_torn_one_survives() {
        // The tail of a frame cut by a snapshot, then a whole frame, on one line.
        let whole = encode(&exec_request(42));
        let mut line = b"ms\":1000}{\"id\":41,\"op\":\"pi".to_vec();
        line.extend_from_slice(&whole);
        let got: Request = decode(&line).expect("the whole frame is recovered");
        assert_eq!(got.id, 42);
    }

    #[test]
    fn oversized_lines_are_dropped() {
        let line = vec![b' '; MAX_FRAME_BYTES + 10];
        assert_eq!(decode::<Request>(&line), None);
    }

    #[test]
    fn escaped_length_matches_serde_json() {
        let samples = [
            String::new(),
            "plain text".into(),
            "tab\tnew\nline\r\"quoted\" back\\slash \u{8}\u{c}".into(),
            (0u8..=0x7f).map(char::from).collect::<String>(),
            "héllo wörld ✓ 𝄞".into(),
        ];
        for s in samples {
            let encoded = serde_json::to_vec(&s).unwrap();
            assert_eq!(json_escaped_len(&s), encoded.len() - 2, "{s:?}");
        }
    }

    #[test]
    fn ordinary_text_keeps_both_full_streams() {
        // Newlines are the worst text there is: two bytes each once escaped.
        let mut r = ExecResult {
            exit_code: 0,
            stdout: "\n".repeat(MAX_OUTPUT_BYTES),
            stderr: "\"".repeat(MAX_OUTPUT_BYTES),
            timed_out: false,
            truncated: false,
        };
        fit_exec_output(&mut r);
        assert!(!r.truncated);
        assert_eq!(r.stdout.len(), MAX_OUTPUT_BYTES);
        assert_eq!(r.stderr.len(), MAX_OUTPUT_BYTES);
        assert!(
            encode(&Response {
                id: u64::MAX,
                reply: Reply::Exec(r)
            })
            .len()
                <= MAX_FRAME_BYTES
        );
    }

    #[test]
    fn a_short_stream_leaves_its_share_to_the_other() {
        let mut r = ExecResult {
            exit_code: 0,
            stdout: "\u{1}".repeat(MAX_OUTPUT_BYTES),
            stderr: "warning\n".into(),
            timed_out: false,
            truncated: false,
        };
        fit_exec_output(&mut r);
        assert!(r.truncated);
        assert_eq!(r.stderr, "warning\n");
        assert_eq!(
            json_escaped_len(&r.stdout),
            (EXEC_OUTPUT_BUDGET - json_escaped_len("warning\n")) / 6 * 6
        );
    }

    #[test]
    fn cuts_fall_on_char_boundaries() {
        let mut s = "ab✓".to_string();
        assert!(cut_to_escaped(&mut s, 4));
        assert_eq!(s, "ab");
        let mut s = "ab✓".to_string();
        assert!(!cut_to_escaped(&mut s, 5));
        assert_eq!(s, "ab✓");
    }

    #[test]
    fn frame_ids_come_from_the_head() {
        let line = encode(&exec_request(123_456));
        assert_eq!(frame_id(&line[..OVERSIZED_HEAD_BYTES]), Some(123_456));
        assert_eq!(frame_id(b"{\"id\":12"), None, "could be the start of 123");
        assert_eq!(frame_id(b"{\"id\":12,"), Some(12));
        assert_eq!(frame_id(b"{\"id\":x,"), None);
        assert_eq!(frame_id(b"aaaa{\"id\":1,"), None);
        assert_eq!(frame_id(b"{\"id\":99999999999999999999999,"), None);
    }
}
