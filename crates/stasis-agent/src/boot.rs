//! Early boot: the initramfs stage (load virtio modules, mount the root disk, switch to it) and
//! the root stage (the file systems a Debian userspace expects).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Present only in the initramfs; tells the binary which part it plays.
pub const INITRAMFS_MARKER: &str = "/stasis-initramfs";
/// Module file names, one per line, in load order (dependencies first).
const MODULE_ORDER: &str = "/modules/order";

fn cstr(s: impl AsRef<std::ffi::OsStr>) -> CString {
    CString::new(s.as_ref().as_bytes()).expect("paths here never contain NUL")
}

fn mount(src: &str, target: &str, fstype: Option<&str>, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let src = cstr(src);
    let target_c = cstr(target);
    let fstype = fstype.map(cstr);
    let data = cstr(data);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; a null
    // fstype is allowed for MS_MOVE.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("mount {target}: {e}")))
    }
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    let params = cstr("");
    // SAFETY: finit_module reads the open file descriptor and a NUL-terminated parameter
    // string; both stay valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(io::Error::new(e.kind(), format!("loading {}: {e}", path.display())))
    }
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs as `/init` of the initramfs. Returns only on failure.
pub fn initramfs_stage() -> String {
    match initramfs_inner() {
        Ok(never) => match never {},
        Err(e) => e.to_string(),
    }
}

fn initramfs_inner() -> io::Result<std::convert::Infallible> {
    mount("devtmpfs", "/dev", Some("devtmpfs"), 0, "")?;
    mount("proc", "/proc", Some("proc"), 0, "")?;
    mount("sysfs", "/sys", Some("sysfs"), 0, "")?;

    let order = std::fs::read_to_string(MODULE_ORDER)?;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        load_module(&Path::new("/modules").join(name))?;
    }

    let cmdline = kernel_cmdline();
    let root = cmdline_value(&cmdline, "root").unwrap_or_else(|| "/dev/vda".into());
    let fstype = cmdline_value(&cmdline, "rootfstype").unwrap_or_else(|| "ext4".into());
    if !wait_for(Path::new(&root), Duration::from_secs(30)) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("root device {root} never appeared"),
        ));
    }
    mount(&root, "/newroot", Some(&fstype), 0, "")?;
    for fs in ["/dev", "/proc", "/sys"] {
        mount(fs, &format!("/newroot{fs}"), None, libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir("/newroot")?;
    mount(".", "/", None, libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: chroot takes a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;

    let init = cstr("/sbin/init");
    let argv = [init.as_ptr(), std::ptr::null()];
    // SAFETY: argv is a null-terminated array of valid C strings that outlive the call.
    unsafe { libc::execv(init.as_ptr(), argv.as_ptr()) };
    Err(io::Error::last_os_error())
}

/// Runs as PID 1 of the root disk: the rest of the file systems, hostname, loopback.
pub fn root_stage() -> io::Result<()> {
    if !is_mountpoint("/proc") {
        mount("proc", "/proc", Some("proc"), 0, "")?;
    }
    if !is_mountpoint("/sys") {
        mount("sysfs", "/sys", Some("sysfs"), 0, "")?;
    }
    if !is_mountpoint("/dev") {
        mount("devtmpfs", "/dev", Some("devtmpfs"), 0, "")?;
    }
    mount("devpts", "/dev/pts", Some("devpts"), 0, "mode=620,ptmxmode=666")?;
    mount("tmpfs", "/dev/shm", Some("tmpfs"), 0, "mode=1777")?;
    mount("tmpfs", "/run", Some("tmpfs"), 0, "mode=755")?;
    mount("tmpfs", "/tmp", Some("tmpfs"), 0, "mode=1777")?;
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/0", "/dev/stdin");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/1", "/dev/stdout");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/2", "/dev/stderr");

    let cmdline = kernel_cmdline();
    if let Some(name) = cmdline_value(&cmdline, "stasis.hostname") {
        crate::identity::set_hostname(&name)?;
    }
    // A machine-id of its own on first boot, as systemd would make (restores get a new one).
    if let Err(e) = crate::identity::ensure_machine_id() {
        crate::log(&format!("making /etc/machine-id: {e}"));
    }
    if let Err(e) = loopback_up() {
        crate::log(&format!("bringing up lo: {e}"));
    }
    if let Some(value) = cmdline_value(&cmdline, "stasis.net") {
        match crate::net::GuestNet::parse(&value) {
            Some(net) => {
                if let Err(e) = crate::net::configure(&net) {
                    crate::log(&format!("configuring eth0: {e}"));
                }
                if let Err(e) = crate::net::accept_fast_open() {
                    crate::log(&format!("enabling TCP Fast Open: {e}"));
                }
            }
            None => crate::log(&format!(
                "stasis.net={value} does not read as ADDRESS/PREFIX,GATEWAY,DNS"
            )),
        }
    }
    Ok(())
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a socket we own and req a valid ifreq for these ioctls.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

/// Finds the device node of the virtio-serial port called `name`.
pub fn find_port(name: &str) -> io::Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if port_name.trim() == name {
                    let dev = Path::new("/dev").join(entry.file_name());
                    if wait_for(&dev, Duration::from_secs(5)) {
                        return Ok(dev);
                    }
                }
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio port named {name}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_from_the_kernel_command_line() {
        let c = "console=ttyS0 root=/dev/vda rw stasis.hostname=dev-1 quiet";
        assert_eq!(cmdline_value(c, "root").as_deref(), Some("/dev/vda"));
        assert_eq!(cmdline_value(c, "stasis.hostname").as_deref(), Some("dev-1"));
        assert_eq!(cmdline_value(c, "rootfstype"), None);
        assert_eq!(cmdline_value(c, "rw"), None);
    }
}
