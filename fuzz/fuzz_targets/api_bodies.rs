//! API request bodies: the JSON-object reader, the typed bodies the handlers take, and every
//! validator they use. Bad input is an error value (400/422), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_server::body::{Json, JsonObject};
use stasis_server::computers::Computers;
use stasis_server::snapshots::Snapshots;
use stasis_types::{
    CloneRequest, CreateComputerRequest, CreateSnapshotRequest, ExecPythonRequest, ExecRequest, RestoreRequest, SseTicketRequest,
    StartRequest,
};

fuzz_target!(|data: &[u8]| {
    // The typed bodies: each is a value or a 400/422 error, whatever the bytes.
    let _ = Json::<ExecRequest>::parse(data);
    let _ = Json::<ExecPythonRequest>::parse(data);
    let _ = Json::<CloneRequest>::parse(data);
    let _ = Json::<SseTicketRequest>::parse(data);
    let _ = Json::<StartRequest>::parse(data);
    let _ = Json::<RestoreRequest>::parse(data);
    if let Ok(Json(req)) = Json::<CreateComputerRequest>::parse(data) {
        if let Ok(new) = Computers::validate(req) {
            assert!(!new.name.is_empty() && new.name.chars().count() <= 128);
        }
    }
    if let Ok(Json(req)) = Json::<CreateSnapshotRequest>::parse(data) {
        if let Ok(Some(c)) = Snapshots::validate_comment(req.comment) {
            assert!(c.chars().count() <= 500);
        }
    }
    let Ok(body) = JsonObject::parse(data) else {
        return;
    };
    if let Ok(Some(t)) = body.optional_seconds("timeout", 3600) {
        assert!(t <= 3600);
    }
    let _ = body.required_str("command");
    let _ = body.optional_str("name");
    let _ = body.optional_object("metadata");
});
