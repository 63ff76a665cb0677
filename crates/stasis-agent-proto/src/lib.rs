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

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "stasis.agent";

/// Protocol version, reported by the agent in [`Reply::Hello`] and [`Reply::Pong`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either end accepts; longer lines are discarded.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Cap on captured stdout and on captured stderr of one command, each.
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024 * 1024;

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
    /// Output beyond [`MAX_OUTPUT_BYTES`] was dropped.
    pub truncated: bool,
}

/// Exit code reported for a command killed by its timeout, as coreutils `timeout` does.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

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
}
