//! A stored chunk as fetched from the store: decoding never panics and never returns data
//! that does not hash to the name it was fetched by.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_store::chunk::{decode, encode, ChunkHash};

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    let (name, stored) = data.split_at(32);
    let expected = ChunkHash(name.try_into().expect("32 bytes"));
    if let Ok(raw) = decode(stored, expected) {
        assert_eq!(ChunkHash::of(&raw), expected);
    }
    // And whatever is encoded decodes back under its own name.
    if !stored.is_empty() {
        let h = ChunkHash::of(stored);
        assert_eq!(decode(&encode(stored, 1), h).expect("round trip"), stored);
    }
});
