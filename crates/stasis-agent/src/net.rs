//! The guest's network: `eth0` addressed as the kernel command line says
//! (`stasis.net=ADDRESS/PREFIX,GATEWAY,DNS`), a default route through the gateway, and the
//! resolver at DNS. Every computer, and every clone of one, has the same guest-side addresses:
//! what tells computers apart is on the host's side of their network.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// A guest network as the command line gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
}

impl GuestNet {
    /// Reads `ADDRESS/PREFIX,GATEWAY,DNS`.
    pub fn parse(value: &str) -> Option<GuestNet> {
        let mut parts = value.split(',');
        let (address, prefix) = parts.next()?.split_once('/')?;
        let net = GuestNet {
            address: address.parse().ok()?,
            prefix: prefix.parse().ok().filter(|p| (1..=30).contains(p))?,
            gateway: parts.next()?.parse().ok()?,
            dns: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(net)
    }

    fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }
}

/// Brings `eth0` up as `net` says (waiting a little for the device to appear) and writes the
/// resolver's address to `/etc/resolv.conf`.
pub fn configure(net: &GuestNet) -> io::Result<()> {
    let start = Instant::now();
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "eth0 never appeared"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = Socket::new()?;
    sock.set_address("eth0", libc::SIOCSIFADDR, net.address)?;
    sock.set_address("eth0", libc::SIOCSIFNETMASK, net.netmask())?;
    sock.up("eth0")?;
    sock.default_route(net.gateway)?;
    std::fs::write("/etc/resolv.conf", format!("nameserver {}\n", net.dns))?;
    Ok(())
}

/// `net.ipv4.tcp_fastopen` as the agent sets it: clients may use Fast Open as usual (1), and
/// every listener takes data in a SYN (2) without a cookie (0x200) and without asking for it
/// (0x400). The platform's preview proxy sends a request in its SYN, which saves the guest one
/// round trip of a handshake a connection; only the host can reach a guest's listeners from
/// outside it (the egress policy keeps other computers away). A user can set it back.
pub const FAST_OPEN: u32 = 0x1 | 0x2 | 0x200 | 0x400;

/// Sets [`FAST_OPEN`], before any service of the root disk listens (a listener takes the
/// setting when it starts listening).
pub fn accept_fast_open() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", format!("{FAST_OPEN}\n"))
}

/// An AF_INET datagram socket, for the interface and route ioctls.
struct Socket(libc::c_int);

impl Socket {
    fn new() -> io::Result<Socket> {
        // SAFETY: socket() takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn request(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn set_address(&self, name: &str, op: libc::c_ulong, address: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::request(name);
        // SAFETY: the union's address member is a sockaddr, which a sockaddr_in fills.
        unsafe {
            let sin = std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>();
            (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
            (*sin).sin_addr.s_addr = u32::from(address).to_be();
        }
        self.ioctl(op, std::ptr::addr_of_mut!(req).cast())
    }

    fn up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::request(name);
        self.ioctl(libc::SIOCGIFFLAGS, std::ptr::addr_of_mut!(req).cast())?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, std::ptr::addr_of_mut!(req).cast())
    }

    fn default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain old data; all-zero is a valid value (destination and mask
        // 0.0.0.0: the default route).
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        let inet = |sa: &mut libc::sockaddr, address: Ipv4Addr| {
            // SAFETY: a sockaddr has room for a sockaddr_in.
            unsafe {
                let sin = (sa as *mut libc::sockaddr).cast::<libc::sockaddr_in>();
                (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sin).sin_addr.s_addr = u32::from(address).to_be();
            }
        };
        inet(&mut rt.rt_dst, Ipv4Addr::UNSPECIFIED);
        inet(&mut rt.rt_genmask, Ipv4Addr::UNSPECIFIED);
        inet(&mut rt.rt_gateway, gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        match self.ioctl(libc::SIOCADDRT, std::ptr::addr_of_mut!(rt).cast()) {
            // A restored guest's route is there already.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    fn ioctl(&self, op: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: `arg` points at the structure `op` takes, alive for the call.
        if unsafe { libc::ioctl(self.0, op as _, arg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_form_is_read_strictly() {
        let net = GuestNet::parse("172.31.0.2/24,172.31.0.1,172.31.0.1").unwrap();
        assert_eq!(net.address, Ipv4Addr::new(172, 31, 0, 2));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(net.gateway, Ipv4Addr::new(172, 31, 0, 1));
        for bad in [
            "",
            "172.31.0.2,172.31.0.1,172.31.0.1",
            "172.31.0.2/0,172.31.0.1,172.31.0.1",
            "172.31.0.2/24,172.31.0.1",
            "172.31.0.2/24,172.31.0.1,172.31.0.1,x",
            "example/24,172.31.0.1,172.31.0.1",
        ] {
            assert_eq!(GuestNet::parse(bad), None, "{bad}");
        }
    }
}
