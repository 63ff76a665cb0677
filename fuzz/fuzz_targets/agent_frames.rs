//! The host ↔ guest-agent protocol, both ends: a line from the guest (which a compromised
//! guest controls) decoded by the host, and a line from the host decoded by the agent. Never
//! a panic; what decodes re-encodes to a frame that decodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_agent_proto::{decode, encode, Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Some(r) = decode::<Response>(data) {
        let line = encode(&r);
        assert_eq!(decode::<Response>(&line[..line.len() - 1]), Some(r));
    }
    if let Some(r) = decode::<Request>(data) {
        let line = encode(&r);
        assert_eq!(decode::<Request>(&line[..line.len() - 1]), Some(r));
    }
});
