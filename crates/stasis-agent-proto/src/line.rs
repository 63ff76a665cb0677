//! A line reader whose memory is bounded by its maximum line length, whatever the peer sends.
//!
//! `read_until(b'\n')` and `lines()` grow their buffer for as long as the peer withholds the
//! newline, so a peer that never sends one can make the reader take all the memory there is.
//! [`LineReader`] keeps at most `max` bytes of a line; once a line passes that, the rest of it
//! is skipped up to the next `\n` without being stored, the line is reported as
//! [`Next::Oversized`], and reading goes on with the line after it.

use std::io::BufRead;

/// How many leading bytes of an oversized line are kept, so the caller can tell whose answer it
/// was (a frame starts with its id, see [`crate::frame_id`]).
pub const OVERSIZED_HEAD_BYTES: usize = 64;

/// A buffer bigger than this is given back once its line has been handled: one long line
/// should not pin its memory for the life of the connection.
const KEEP_CAPACITY: usize = 256 * 1024;

/// What [`LineReader::read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A whole line; [`LineReader::line`] holds it, without its `\n`.
    Line,
    /// A line longer than the maximum, now skipped. `len` is its full length (without `\n`);
    /// [`LineReader::line`] holds its first [`OVERSIZED_HEAD_BYTES`] bytes.
    Oversized { len: u64 },
    /// End of input for now. A partial line is kept: reading again continues it (the agent's
    /// port reads as end-of-file while no host is connected, and then goes on).
    Eof,
}

/// Reads `\n`-terminated lines of at most `max` bytes from any `BufRead` or (with the `tokio`
/// feature) `AsyncBufRead`.
#[derive(Debug)]
pub struct LineReader {
    max: usize,
    line: Vec<u8>,
    /// Length of the current line so far, counting bytes that were skipped.
    len: u64,
    /// The current line passed `max`; its bytes are being skipped.
    skipping: bool,
    /// The last call returned a line; the next one starts afresh.
    finished: bool,
    peak_capacity: usize,
}

impl LineReader {
    pub fn new(max: usize) -> LineReader {
        LineReader {
            max,
            line: Vec::new(),
            len: 0,
            skipping: false,
            finished: false,
            peak_capacity: 0,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The line found by the last [`Next::Line`], or the head of the last [`Next::Oversized`].
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// The most memory the line buffer has ever held: never more than `max` (what the
    /// regression tests check).
    pub fn peak_capacity(&self) -> usize {
        self.peak_capacity
    }

    /// Reads the next line from a blocking reader. An error leaves the partial line in place,
    /// so the caller may simply call again.
    pub fn read_line<R: BufRead + ?Sized>(&mut self, reader: &mut R) -> std::io::Result<Next> {
        self.start();
        loop {
            let available = reader.fill_buf()?;
            if available.is_empty() {
                return Ok(Next::Eof);
            }
            let (used, next) = self.feed(available);
            reader.consume(used);
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    /// Reads the next line from an async reader. Cancel-safe: a dropped call loses nothing,
    /// the partial line stays in `self`.
    #[cfg(feature = "tokio")]
    pub async fn read_line_async<R>(&mut self, reader: &mut R) -> std::io::Result<Next>
    where
        R: tokio::io::AsyncBufRead + Unpin + ?Sized,
    {
        use tokio::io::AsyncBufReadExt;
        self.start();
        loop {
            let available = reader.fill_buf().await?;
            if available.is_empty() {
                return Ok(Next::Eof);
            }
            let (used, next) = self.feed(available);
            reader.consume(used);
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }

    fn start(&mut self) {
        if !self.finished {
            return;
        }
        self.finished = false;
        self.len = 0;
        self.skipping = false;
        if self.line.capacity() > KEEP_CAPACITY {
            self.line = Vec::new();
        } else {
            self.line.clear();
        }
    }

    /// Takes what it can from `available`: returns how many bytes it used, and the outcome
    /// if a line ended within them.
    fn feed(&mut self, available: &[u8]) -> (usize, Option<Next>) {
        let (chunk, used, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        self.len += chunk.len() as u64;
        if !self.skipping {
            if self.len > self.max as u64 {
                self.skipping = true;
                let room = OVERSIZED_HEAD_BYTES.saturating_sub(self.line.len());
                self.line.extend_from_slice(&chunk[..room.min(chunk.len())]);
                self.line.truncate(OVERSIZED_HEAD_BYTES);
                self.line.shrink_to(OVERSIZED_HEAD_BYTES);
            } else {
                self.append(chunk);
            }
        }
        if !ended {
            return (used, None);
        }
        self.finished = true;
        let next = if self.skipping {
            Next::Oversized { len: self.len }
        } else {
            Next::Line
        };
        (used, Some(next))
    }

    /// Appends bytes of a line known to fit, growing the buffer by doubling but never past
    /// `max` (a plain `extend` could double a nearly full buffer to twice the maximum).
    fn append(&mut self, chunk: &[u8]) {
        let need = self.line.len() + chunk.len();
        if need > self.line.capacity() {
            let target = (self.line.capacity() * 2).max(need).max(64).min(self.max.max(need));
            self.line.reserve_exact(target - self.line.len());
        }
        self.line.extend_from_slice(chunk);
        self.peak_capacity = self.peak_capacity.max(self.line.capacity());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its data a few bytes at a time, as a socket might.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        buf: Vec<u8>,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(self.data.len()).min(out.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    impl BufRead for Trickle<'_> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            if self.buf.is_empty() {
                let n = self.step.min(self.data.len());
                self.buf = self.data[..n].to_vec();
                self.data = &self.data[n..];
            }
            Ok(&self.buf)
        }
        fn consume(&mut self, n: usize) {
            self.buf.drain(..n);
        }
    }

    fn all(data: &[u8], max: usize, step: usize) -> (Vec<(Next, Vec<u8>)>, usize) {
        let mut r = Trickle {
            data,
            step,
            buf: Vec::new(),
        };
        let mut lines = LineReader::new(max);
        let mut out = Vec::new();
        loop {
            let next = lines.read_line(&mut r).unwrap();
            if next == Next::Eof {
                return (out, lines.peak_capacity());
            }
            out.push((next, lines.line().to_vec()));
        }
    }

    #[test]
    fn a_line_of_exactly_max_bytes_is_whole() {
        for step in [1, 3, 10, 1000] {
            let (got, _) = all(b"0123456789\nab\n", 10, step);
            assert_eq!(
                got,
                vec![(Next::Line, b"0123456789".to_vec()), (Next::Line, b"ab".to_vec())],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_line_of_max_plus_one_is_oversized_and_skipped() {
        for step in [1, 4, 11, 1000] {
            let (got, _) = all(b"0123456789X\nab\n", 10, step);
            assert_eq!(
                got,
                vec![
                    (Next::Oversized { len: 11 }, b"0123456789X".to_vec()),
                    (Next::Line, b"ab".to_vec())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_line_split_across_many_reads_is_put_back_together() {
        let data = b"{\"id\":1,\"type\":\"done\"}\n{\"id\":2}\n";
        for step in 1..data.len() {
            let (got, _) = all(data, 100, step);
            assert_eq!(
                got,
                vec![
                    (Next::Line, b"{\"id\":1,\"type\":\"done\"}".to_vec()),
                    (Next::Line, b"{\"id\":2}".to_vec())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_huge_line_is_skipped_in_bounded_memory_and_the_next_line_gets_through() {
        let max = 4096;
        let mut data = b"{\"id\":77,\"type\":\"exec\",\"stdout\":\"".to_vec();
        data.resize(10 * 1024 * 1024, b'a');
        data.extend_from_slice(b"\nnext\n\nlast");
        let (got, peak) = all(&data, max, 64 * 1024);
        assert!(peak <= max, "peak {peak}");
        assert_eq!(got.len(), 3, "{:?}", got.iter().map(|(n, _)| n).collect::<Vec<_>>());
        assert_eq!(got[0].0, Next::Oversized { len: 10 * 1024 * 1024 });
        assert_eq!(got[0].1.len(), OVERSIZED_HEAD_BYTES);
        assert_eq!(crate::frame_id(&got[0].1), Some(77));
        assert_eq!(got[1], (Next::Line, b"next".to_vec()));
        assert_eq!(got[2], (Next::Line, Vec::new()));
    }

    #[test]
    fn end_of_input_keeps_a_partial_line_for_later() {
        let mut lines = LineReader::new(100);
        let mut first: &[u8] = b"hel";
        assert_eq!(lines.read_line(&mut first).unwrap(), Next::Eof);
        let mut second: &[u8] = b"lo\n";
        assert_eq!(lines.read_line(&mut second).unwrap(), Next::Line);
        assert_eq!(lines.line(), b"hello");
        // Likewise in the middle of a line being skipped.
        let mut a: &[u8] = &[b'x'; 150];
        assert_eq!(lines.read_line(&mut a).unwrap(), Next::Eof);
        let mut b: &[u8] = b"yy\nok\n";
        assert_eq!(lines.read_line(&mut b).unwrap(), Next::Oversized { len: 152 });
        assert_eq!(lines.read_line(&mut b).unwrap(), Next::Line);
        assert_eq!(lines.line(), b"ok");
    }

    #[test]
    fn a_long_line_does_not_pin_its_buffer() {
        let mut lines = LineReader::new(8 << 20);
        let mut data = vec![b'a'; 4 << 20];
        data.extend_from_slice(b"\nb\n");
        let mut r: &[u8] = &data;
        assert_eq!(lines.read_line(&mut r).unwrap(), Next::Line);
        assert_eq!(lines.line().len(), 4 << 20);
        assert_eq!(lines.read_line(&mut r).unwrap(), Next::Line);
        assert!(lines.line.capacity() <= KEEP_CAPACITY, "{}", lines.line.capacity());
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn the_async_reader_reads_the_same() {
        let mut data = vec![b'z'; 5000];
        data.extend_from_slice(b"\nfine\n");
        let mut r = tokio::io::BufReader::with_capacity(100, &data[..]);
        let mut lines = LineReader::new(1000);
        assert_eq!(
            lines.read_line_async(&mut r).await.unwrap(),
            Next::Oversized { len: 5000 }
        );
        assert_eq!(lines.read_line_async(&mut r).await.unwrap(), Next::Line);
        assert_eq!(lines.line(), b"fine");
        assert_eq!(lines.read_line_async(&mut r).await.unwrap(), Next::Eof);
        assert!(lines.peak_capacity() <= 1000);
    }
}
