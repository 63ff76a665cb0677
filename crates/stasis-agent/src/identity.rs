//! Identity after a restore: every clone of a snapshot starts with the same RNG state and a
//! clock stuck at snapshot time. The host sends fresh entropy and the time right after resume.

use std::io;
use std::os::fd::AsRawFd;

use stasis_agent_proto::IdentityRequest;

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn apply(req: &IdentityRequest) -> io::Result<()> {
    set_clock(req.unix_time_ns)?;
    let entropy = decode_hex(&req.entropy_hex)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "entropy_hex is not hex"))?;
    add_entropy(&entropy)?;
    if let Some(name) = &req.hostname {
        set_hostname(name)?;
    }
    if let Some(id) = &req.machine_id {
        set_machine_id(id)?;
    }
    // Connections open when the snapshot was taken lead nowhere in a restore (a new namespace,
    // or the source's peer): their programs get an error now instead of hanging. Best effort:
    // a guest without socket diagnostics keeps them.
    match crate::connections::reset_remote_tcp() {
        Ok(n) if n > 0 => eprintln!("stasis-agent: reset {n} TCP connections the snapshot caught open"),
        Ok(_) => {}
        Err(e) => eprintln!("stasis-agent: could not reset the snapshot's TCP connections: {e}"),
    }
    Ok(())
}

/// Gives the machine a random machine-id if it has none yet (an empty or missing
/// `/etc/machine-id`, as a fresh image has).
pub fn ensure_machine_id() -> io::Result<()> {
    let current = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    if current.trim().len() == 32 {
        return Ok(());
    }
    let mut bytes = [0u8; 16];
    // SAFETY: bytes is valid for its length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr() as *mut libc::c_void, bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    set_machine_id(&id)
}

/// Writes `/etc/machine-id` (replacing it whole: a reader never sees half of one).
fn set_machine_id(id: &str) -> io::Result<()> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a machine-id is 32 lowercase hex digits",
        ));
    }
    let tmp = "/etc/.machine-id.stasis";
    std::fs::write(tmp, format!("{id}\n"))?;
    std::fs::rename(tmp, "/etc/machine-id")
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe a valid byte slice.
    let rc = unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_clock(unix_time_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: info holds a rand_pool_info header followed by buf_size bytes, as the ioctl reads.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_hex() {
        assert_eq!(super::decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(super::decode_hex("0"), None);
        assert_eq!(super::decode_hex("zz"), None);
    }
}
