//! The request loop: read frames from the port, answer each by id, run commands on their own
//! threads, and remember recent ids so a frame repeated after a restore is not run twice.

use std::collections::{HashSet, VecDeque};
use std::io::{BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stasis_agent_proto::{
    decode, encode, LineReader, Next, Op, Reply, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

/// How many finished answers are kept for repeated requests.
const REMEMBERED: usize = 256;
/// How many bytes of finished answers are kept: a few exec replies can be tens of MiB each,
/// and the guest may have little memory. The newest answer is kept whatever its size.
const REMEMBERED_BYTES: usize = 64 * 1024 * 1024;

/// An encoded answer, shared rather than copied each time a repeat is answered. (An `Arc<[u8]>`
/// would copy it once more on the way in: tens of MiB in a guest that may have 256.)
type Answer = Arc<Vec<u8>>;

#[derive(Default)]
struct Seen {
    running: HashSet<u64>,
    done: VecDeque<(u64, Answer)>,
    done_bytes: usize,
}

enum Admission {
    New,
    Running,
    Done(Answer),
}

impl Seen {
    fn admit(&mut self, id: u64) -> Admission {
        if self.running.contains(&id) {
            return Admission::Running;
        }
        if let Some((_, line)) = self.done.iter().find(|(i, _)| *i == id) {
            return Admission::Done(line.clone());
        }
        self.running.insert(id);
        Admission::New
    }

    fn finish(&mut self, id: u64, line: Answer) {
        self.running.remove(&id);
        self.done_bytes += line.len();
        self.done.push_back((id, line));
        while self.done.len() > REMEMBERED || (self.done_bytes > REMEMBERED_BYTES && self.done.len() > 1) {
            if let Some((_, old)) = self.done.pop_front() {
                self.done_bytes -= old.len();
            }
        }
    }
}

type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(writer: &Writer, line: &[u8]) {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    // A failed write means the host is gone; it asks again when it comes back.
    let _ = w.write_all(line).and_then(|_| w.flush());
}

/// Serves the virtio-serial port at `path`. Returns only if the port cannot be opened.
pub fn serve_port(path: &std::path::Path) {
    let open = || std::fs::OpenOptions::new().read(true).write(true).open(path);
    let (reader, writer) = match open().and_then(|f| Ok((f.try_clone()?, f))) {
        Ok(pair) => pair,
        Err(e) => {
            crate::log(&format!("opening {}: {e}", path.display()));
            return;
        }
    };
    // While no host is connected the port reads as end-of-file; that is not the end.
    serve(Box::new(reader), Box::new(writer), false);
}

/// Serves stdin/stdout until stdin closes (development and tests on the host).
pub fn serve_stdio() {
    serve(Box::new(std::io::stdin()), Box::new(std::io::stdout()), true);
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("pid-{}", std::process::id()))
}

fn serve(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>, eof_is_final: bool) {
    let writer: Writer = Arc::new(Mutex::new(writer));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let boot_id = boot_id();

    // The leading newline ends whatever half frame the host may hold from before.
    let mut hello = b"\n".to_vec();
    hello.extend(encode(&Response {
        id: 0,
        reply: Reply::Hello {
            version: PROTOCOL_VERSION,
            boot_id: boot_id.clone(),
        },
    }));
    send(&writer, &hello);

    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    // Bounded: whatever writes to the port (the host, or anything that got hold of its other
    // end) cannot make PID 1 buffer more than one frame.
    let mut lines = LineReader::new(MAX_FRAME_BYTES);
    loop {
        match lines.read_line(&mut reader) {
            Ok(Next::Line) => {}
            Ok(Next::Oversized { len }) => {
                crate::log(&format!(
                    "dropped a {len}-byte line from the host (over {MAX_FRAME_BYTES})"
                ));
                continue;
            }
            Ok(Next::Eof) => {
                if eof_is_final {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        }
        let request: Option<Request> = decode(lines.line());
        let Some(Request { id, op }) = request else {
            continue;
        };
        if let Op::Ping = op {
            let pong = Reply::Pong {
                version: PROTOCOL_VERSION,
                boot_id: boot_id.clone(),
                uptime_ms: started.elapsed().as_millis() as u64,
            };
            send(&writer, &encode(&Response { id, reply: pong }));
            continue;
        }
        // A chunk of a file read, a stat, a listing, a session's output: run again if asked
        // again after its answer, not remembered (a guest may have little memory, and chunks
        // are large). A repeat while it runs is told so, as for any request, rather than run
        // beside it.
        if op.only_reads() {
            let first = seen.lock().unwrap_or_else(|p| p.into_inner()).running.insert(id);
            if !first {
                send(
                    &writer,
                    &encode(&Response {
                        id,
                        reply: Reply::Running,
                    }),
                );
                continue;
            }
            let writer = writer.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                let reply = handle(op);
                seen.lock().unwrap_or_else(|p| p.into_inner()).running.remove(&id);
                send(&writer, &encode(&Response { id, reply }));
            });
            continue;
        }
        let admission = seen.lock().unwrap_or_else(|p| p.into_inner()).admit(id);
        match admission {
            Admission::Running => send(
                &writer,
                &encode(&Response {
                    id,
                    reply: Reply::Running,
                }),
            ),
            Admission::Done(answer) => send(&writer, &answer),
            Admission::New => {
                let writer = writer.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let reply = handle(op);
                    let answer: Answer = Arc::new(encode(&Response { id, reply }));
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .finish(id, answer.clone());
                    send(&writer, &answer);
                });
            }
        }
    }
}

fn handle(op: Op) -> Reply {
    match op {
        Op::Ping => Reply::Done,
        Op::Exec(req) => Reply::Exec(crate::exec::run(&req)),
        Op::Fs(op) => Reply::Fs(crate::fs::run(op)),
        Op::Session(op) => Reply::Session(crate::sessions::run(op)),
        Op::Sync => {
            // SAFETY: sync takes no arguments.
            unsafe { libc::sync() };
            Reply::Done
        }
        Op::Identity(req) => match crate::identity::apply(&req) {
            Ok(()) => {
                crate::log(&format!(
                    "restored as a new machine{}",
                    req.hostname.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
                ));
                // Only a restore sends an identity: the clone's processes learn of it now.
                crate::hooks::after_restore(req.hostname.clone());
                // The original's clients streamed those; the clone has none of them.
                let ended = crate::sessions::end_attached();
                if ended > 0 {
                    crate::log(&format!("ended {ended} streamed session(s) of the original machine"));
                }
                Reply::Done
            }
            Err(e) => Reply::Error {
                message: format!("identity: {e}"),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_ids_are_answered_from_memory() {
        let mut seen = Seen::default();
        assert!(matches!(seen.admit(1), Admission::New));
        assert!(matches!(seen.admit(1), Admission::Running));
        seen.finish(1, Arc::new(b"answer".to_vec()));
        match seen.admit(1) {
            Admission::Done(line) => assert_eq!(&line[..], b"answer"),
            _ => panic!("a finished id must be answered from memory"),
        }
        assert!(matches!(seen.admit(2), Admission::New));
    }

    #[test]
    fn memory_is_bounded() {
        let mut seen = Seen::default();
        for id in 0..(REMEMBERED as u64 + 10) {
            seen.admit(id);
            seen.finish(id, Arc::default());
        }
        assert_eq!(seen.done.len(), REMEMBERED);
        assert!(
            matches!(seen.admit(0), Admission::New),
            "the oldest answers are forgotten"
        );
    }

    #[test]
    fn remembered_bytes_are_bounded_but_the_newest_answer_stays() {
        let mut seen = Seen::default();
        let big = || -> Answer { Arc::new(vec![b'x'; REMEMBERED_BYTES / 2 + 1]) };
        for id in 1..=3 {
            seen.admit(id);
            seen.finish(id, big());
        }
        assert_eq!(seen.done.len(), 1);
        assert!(matches!(seen.admit(3), Admission::Done(_)));
        assert!(matches!(seen.admit(2), Admission::New));
        seen.admit(9);
        seen.finish(9, Arc::new(vec![b'y'; REMEMBERED_BYTES * 2]));
        assert!(
            matches!(seen.admit(9), Admission::Done(_)),
            "even an answer over the budget is kept while it is the newest"
        );
        assert_eq!(seen.done_bytes, REMEMBERED_BYTES * 2);
    }
}
