//! The host ↔ guest-agent protocol, both ends: a line from the guest (which a compromised
//! guest controls) decoded by the host, and a line from the host decoded by the agent. Never
//! a panic; what decodes re-encodes to a frame that decodes to the same. The bounded line
//! reader both ends read with never holds more than its maximum and accounts for every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_agent_proto::{decode, encode, LineReader, Next, Request, Response, OVERSIZED_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(r) = decode::<Response>(data) {
        let line = encode(&r);
        assert_eq!(decode::<Response>(&line[..line.len() - 1]), Some(r));
    }
    if let Some(r) = decode::<Request>(data) {
        let line = encode(&r);
        assert_eq!(decode::<Request>(&line[..line.len() - 1]), Some(r));
    }

    const MAX: usize = 64;
    let mut lines = LineReader::new(MAX);
    let mut input = data;
    let mut accounted = 0u64;
    loop {
        match lines.read_line(&mut input).expect("a slice never fails") {
            Next::Eof => break,
            Next::Line => {
                assert!(lines.line().len() <= MAX && !lines.line().contains(&b'\n'));
                accounted += lines.line().len() as u64 + 1;
            }
            Next::Oversized { len } => {
                assert!(len > MAX as u64 && lines.line().len() <= OVERSIZED_HEAD_BYTES);
                accounted += len + 1;
            }
        }
    }
    assert!(lines.peak_capacity() <= MAX);
    let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    assert_eq!(accounted, complete as u64);
});
