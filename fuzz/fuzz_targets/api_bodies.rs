//! API request bodies: the JSON-object reader and every validator the handlers use. Bad input
//! is an error value (400/422), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_server::body::JsonObject;
use stasis_server::computers::Computers;
use stasis_server::snapshots::Snapshots;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = JsonObject::parse(data) else {
        return;
    };
    if let Ok(new) = Computers::validate(&body) {
        assert!(!new.name.is_empty() && new.name.chars().count() <= 128);
    }
    if let Ok(Some(c)) = Snapshots::validate_comment(&body) {
        assert!(c.chars().count() <= 500);
    }
    if let Ok(Some(t)) = body.optional_seconds("timeout", 3600) {
        assert!(t <= 3600);
    }
    let _ = body.required_str("command");
    let _ = body.optional_str("name");
    let _ = body.optional_object("metadata");
});
