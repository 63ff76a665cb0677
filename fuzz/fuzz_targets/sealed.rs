//! Sealed (encrypted) chunks and manifests as fetched from the store, opened with a fixed
//! tenant key: opening never panics, and whatever opens is what that key sealed under that
//! name. The first byte picks chunk or manifest; for chunks the next 32 are the name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_store::seal::{is_sealed_chunk, parse_manifest_header, TenantKey};
use stasis_store::ChunkHash;

fuzz_target!(|data: &[u8]| {
    let key = TenantKey::from_data_key("t", &[7; 32]);
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if rest.len() < 32 {
            return;
        }
        let (name, stored) = rest.split_at(32);
        let name = ChunkHash(name.try_into().expect("32 bytes"));
        let _ = is_sealed_chunk(stored);
        if let Ok(raw) = key.open_chunk(stored, name) {
            assert_eq!(key.chunk_name(&raw), name);
        }
        // What is sealed opens back under its own name.
        if !stored.is_empty() {
            let own = key.chunk_name(stored);
            assert_eq!(key.open_chunk(&key.seal_chunk(own, stored, 1), own).expect("round trip"), stored);
        }
    } else {
        let _ = parse_manifest_header(rest);
        if let Ok(m) = key.open_manifest(rest, "s") {
            assert_eq!(m.tenant_id, "t");
        }
    }
});
