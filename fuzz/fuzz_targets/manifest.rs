//! A snapshot manifest as read back from the store (anyone with write access to the bucket
//! controls these bytes): decoding never panics, and what decodes re-encodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_store::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        let again = Manifest::decode(&m.encode()).expect("an encoded manifest decodes");
        assert_eq!(again, m);
        let _ = m.chunk_set();
    }
    // The same bytes as the JSON inside a manifest (the compression layer is easy to pass).
    if let Ok(m) = Manifest::decode(&zstd_frame(data)) {
        assert_eq!(Manifest::decode(&m.encode()).expect("round trip"), m);
    }
});

/// `data` as one zstd frame holding a single raw (stored) block, so the fuzzer reaches the
/// JSON parser: magic, a header saying "single segment, 4-byte content size", the size, then
/// a last raw block.
fn zstd_frame(data: &[u8]) -> Vec<u8> {
    let len = data.len().min(100_000);
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let block = ((len as u32) << 3) | 1;
    out.extend_from_slice(&block.to_le_bytes()[..3]);
    out.extend_from_slice(&data[..len]);
    out
}
