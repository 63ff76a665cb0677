//! Resetting the TCP connections a snapshot caught open, after a restore.
//!
//! A restored guest wakes in a new network namespace, with a fresh connection tracker and a
//! different host-side address: a connection that was open at snapshot time has no peer any
//! more (or its peer is the source's). Left alone, its program waits for a retransmission
//! timeout — minutes. The kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) list the guest's
//! TCP sockets, and `SOCK_DESTROY` aborts one: the program gets `ECONNABORTED` at once, the
//! peer (if any) a reset. Listening sockets and connections over loopback (both ends inside
//! this guest, copied together) are kept.

use std::io;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;

/// TCP states of connections that have (or had) a peer: established, SYN-sent, SYN-received,
/// FIN-wait 1 and 2, close-wait, last-ACK, closing.
const CONNECTED_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

/// `struct inet_diag_sockid`: 48 bytes.
const SOCKID_LEN: usize = 48;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;

/// One socket the kernel listed: its family and `inet_diag_sockid` as sent.
struct Listed {
    family: u8,
    sockid: [u8; SOCKID_LEN],
}

impl Listed {
    /// Whether both ends are loopback addresses (the connection lives inside the guest).
    fn is_loopback(&self) -> bool {
        let (src, dst) = (&self.sockid[4..20], &self.sockid[20..36]);
        let v4 = |a: &[u8]| a[0] == 127;
        let v6 = |a: &[u8]| a[..15].iter().all(|b| *b == 0) && a[15] == 1;
        // An IPv4-mapped IPv6 address: ::ffff:127.x.y.z.
        let mapped = |a: &[u8]| a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
        match self.family as libc::c_int {
            libc::AF_INET => v4(src) && v4(dst),
            _ => (v6(src) || mapped(src)) && (v6(dst) || mapped(dst)),
        }
    }
}

struct Netlink(libc::c_int);

impl Drop for Netlink {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = Netlink(fd);
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(s)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msg and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0,
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A `SOCK_DIAG` request for TCP sockets of `family` in `states` (the socket `sockid` for a
/// destroy).
fn request(kind: u16, flags: u16, seq: u32, family: u8, states: u32, sockid: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(sockid);
    m
}

/// The netlink messages in one datagram: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + NLMSG_HDR..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Every TCP socket of `family` in a connected state.
fn list(nl: &Netlink, family: u8) -> io::Result<Vec<Listed>> {
    nl.send(&request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        family,
        CONNECTED_STATES,
        &[0; SOCKID_LEN],
    ))?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nl.recv(&mut buf)?;
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let errno = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if payload.len() >= 4 + SOCKID_LEN => {
                    let mut sockid = [0u8; SOCKID_LEN];
                    sockid.copy_from_slice(&payload[4..4 + SOCKID_LEN]);
                    found.push(Listed {
                        family: payload[0],
                        sockid,
                    });
                }
                _ => {}
            }
        }
    }
}

/// Aborts one socket; the kernel's answer (0 or an errno).
fn destroy(nl: &Netlink, s: &Listed, seq: u32) -> io::Result<()> {
    nl.send(&request(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        s.family,
        u32::MAX,
        &s.sockid,
    ))?;
    let mut buf = [0u8; 1024];
    let n = nl.recv(&mut buf)?;
    for (kind, payload) in messages(&buf[..n]) {
        if kind == NLMSG_ERROR {
            let errno = payload
                .get(..4)
                .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
            return match errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
        }
    }
    Ok(())
}

/// Resets every TCP connection of the guest that is not over loopback; how many it reset.
pub fn reset_remote_tcp() -> io::Result<usize> {
    let nl = Netlink::open()?;
    let mut reset = 0;
    let mut seq = 2;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let listed = match list(&nl, family) {
            Ok(l) => l,
            // No IPv6 in this guest: nothing of that family to reset.
            Err(e) if family == libc::AF_INET6 as u8 && e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        for s in listed.iter().filter(|s| !s.is_loopback()) {
            seq += 1;
            match destroy(&nl, s, seq) {
                Ok(()) => reset += 1,
                // Gone by itself in between.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(family: libc::c_int, src: &[u8], dst: &[u8]) -> Listed {
        let mut sockid = [0u8; SOCKID_LEN];
        sockid[4..4 + src.len()].copy_from_slice(src);
        sockid[20..20 + dst.len()].copy_from_slice(dst);
        Listed {
            family: family as u8,
            sockid,
        }
    }

    #[test]
    fn loopback_connections_are_kept() {
        assert!(listed(libc::AF_INET, &[127, 0, 0, 1], &[127, 0, 0, 1]).is_loopback());
        assert!(!listed(libc::AF_INET, &[172, 31, 0, 2], &[10, 214, 0, 2]).is_loopback());
        assert!(!listed(libc::AF_INET, &[127, 0, 0, 1], &[10, 0, 0, 1]).is_loopback());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(listed(libc::AF_INET6, &one, &one).is_loopback());
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        assert!(listed(libc::AF_INET6, &mapped, &one).is_loopback());
        let other = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(!listed(libc::AF_INET6, &one, &other).is_loopback());
    }

    #[test]
    fn requests_have_the_kernels_layout() {
        let m = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            7,
            2,
            CONNECTED_STATES,
            &[0; SOCKID_LEN],
        );
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 72);
        assert_eq!(m[16], 2);
        assert_eq!(m[17], libc::IPPROTO_TCP as u8);
        assert_eq!(
            u32::from_ne_bytes(m[20..24].try_into().unwrap()) & (1 << 10),
            0,
            "not LISTEN"
        );
        assert_eq!(messages(&m).len(), 1);
    }
}
