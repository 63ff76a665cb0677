//! The largest exec reply an honest agent can produce still fits in one frame.

use stasis_agent_proto::{
    decode, encode, fit_exec_output, ExecResult, Reply, Response, MAX_FRAME_BYTES, MAX_OUTPUT_BYTES,
};

#[test]
fn control_bytes_on_both_streams_are_cut_to_fit_the_frame() {
    // What `head -c 8M /dev/zero | tr '\0' '\1'` on stdout and on stderr captures: before the
    // fix this encoded to 96 MiB, three times the frame limit, and the host dropped it.
    let mut result = ExecResult {
        exit_code: 0,
        stdout: "\u{1}".repeat(MAX_OUTPUT_BYTES),
        stderr: "\u{1}".repeat(MAX_OUTPUT_BYTES),
        timed_out: false,
        truncated: false,
    };
    let before = encode(&Response {
        id: u64::MAX,
        reply: Reply::Exec(result.clone()),
    });
    assert!(before.len() > MAX_FRAME_BYTES, "the attack input is what it claims");

    fit_exec_output(&mut result);
    assert!(result.truncated);
    assert!(result.stdout.bytes().all(|b| b == 1) && result.stderr.bytes().all(|b| b == 1));
    // Each stream keeps an even share: about 2.7 MiB of control bytes each.
    assert_eq!(result.stdout.len(), result.stderr.len());
    assert!(result.stdout.len() > MAX_OUTPUT_BYTES / 4, "{}", result.stdout.len());

    let frame = Response {
        id: u64::MAX,
        reply: Reply::Exec(result),
    };
    let line = encode(&frame);
    assert!(line.len() <= MAX_FRAME_BYTES, "{} > {MAX_FRAME_BYTES}", line.len());
    assert_eq!(decode::<Response>(&line[..line.len() - 1]), Some(frame));
}
