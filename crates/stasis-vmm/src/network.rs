//! Computers' networks on this host: each machine gets a network namespace of its own
//! (`/run/netns/stasis-<tag>-<machine>`), which its confined QEMU joins. Inside, the tap
//! [`crate::vm::TAP_NAME`] holds the guest's gateway (`172.31.0.1`) and resolver (`172.31.0.3`)
//! addresses, the same in every namespace, so every computer and every clone has the same
//! guest-side addresses; a veth pair joins the namespace to the host, its namespace end holding
//! the machine's own address from the pool (its `ip_address`), which the guest's traffic is
//! masqueraded to on its way out. On the host, one nftables table per platform decides where
//! that traffic may go (see [`EgressPolicy`]): never to the host itself, another computer, a
//! private, loopback or link-local address, unless an operator allows it; refused connections
//! are reset at once rather than left to time out.
//!
//! A namespace is named (`/run/netns/...`) only until its machine's QEMU has joined it; then
//! it lives exactly as long as that QEMU, so nothing of it outlives the machine, whatever ends
//! the QEMU or the platform. Everything is made with `ip` and `nft` (iproute2, nftables), in a
//! few batched calls.

use crate::vm::GUEST_ADDR;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// An IPv4 network, `ADDRESS/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(a) & mask == u32::from(self.base) & mask
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// A `--egress-allow`/`--egress-deny`/`--network-pool` value that is not `A.B.C.D/N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 network (A.B.C.D/N, N from 0 to 32)")]
pub struct BadCidr(pub String);

impl std::str::FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (base, prefix) = match s.split_once('/') {
            Some((b, p)) => (b, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        let base: Ipv4Addr = base.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Cidr {
            base: Ipv4Addr::from(u32::from(base) & mask),
            prefix,
        })
    }
}

/// Where computers' traffic may go, besides the answers to connections they made.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressPolicy {
    /// Reached even if inside a refused range (`--egress-allow`).
    pub allow: Vec<Cidr>,
    /// Refused besides the default ranges (`--egress-deny`).
    pub deny: Vec<Cidr>,
}

/// What a guest may never reach unless allowed: this host and every private, shared, loopback,
/// link-local (cloud metadata), multicast and reserved range, which holds the platform's own
/// listeners, its database and store where they are on this host or a private network, and
/// every other computer.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// How this platform's computers' networks are made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkSettings {
    /// Names this platform's namespaces, interfaces and table apart from another's on the host.
    pub tag: String,
    /// Where computers' host-side addresses come from, a /30 each (`--network-pool`).
    pub pool: Cidr,
    /// The group confined QEMUs share: their taps are this group's to open.
    pub shared_gid: u32,
    pub egress: EgressPolicy,
    /// The UDP port of the DNS forwarder on this host ([`crate::dns`]), which each namespace
    /// sends queries for `172.31.0.3` to; None: no resolver (lookups are refused at once).
    pub dns_port: Option<u16>,
}

/// One machine's network, as made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub netns: String,
    /// The host's end of the veth pair (`stv<tag><slot>`), and its address.
    pub host_if: String,
    pub host_addr: Ipv4Addr,
    /// The namespace's end: the computer's own address on this host.
    pub ip_address: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the network pool {0} is full")]
    PoolFull(Cidr),
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
}

/// This platform's computers' networks on this host.
pub struct Networks {
    settings: NetworkSettings,
    /// Slots this process gave out, by namespace name (a slot another process gave out, or
    /// an earlier one, is in use while its veth is on the host).
    slots: Mutex<std::collections::BTreeMap<String, u32>>,
}

impl Networks {
    /// Sets up the host's side (forwarding, the egress table).
    pub fn open(settings: NetworkSettings) -> Result<Networks, NetworkError> {
        let networks = Networks {
            settings,
            slots: Mutex::new(Default::default()),
        };
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetworkError::Command {
            what: "turning on IPv4 forwarding".into(),
            detail: e.to_string(),
        })?;
        networks.write_table()?;
        // Names a process that died before its QEMU started left: the namespace itself lives
        // on while a QEMU is in it.
        let prefix = networks.netns_prefix();
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                networks.remove_netns(&name);
            }
        }
        Ok(networks)
    }

    /// The namespace machine `machine` gets.
    pub fn netns_name(&self, machine: &str) -> String {
        format!("{}{machine}", self.netns_prefix())
    }

    fn netns_prefix(&self) -> String {
        format!("stasis-{}-", self.settings.tag)
    }

    fn if_prefix(&self) -> String {
        format!("stv{}", &self.settings.tag[..self.settings.tag.len().min(4)])
    }

    fn table(&self) -> String {
        format!("stasis_{}", self.settings.tag)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, u32>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses of slot `slot`: the host's end and the namespace's end of its /30.
    fn addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.settings.pool.base) + slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    fn slots_in_pool(&self) -> u32 {
        let size = 1u64 << (32 - u32::from(self.settings.pool.prefix));
        (size / 4).min(u64::from(u32::MAX)) as u32
    }

    /// The network of `machine`, made if it is not there yet (a machine whose QEMU an earlier
    /// process left running keeps its own). Blocking: call off the async runtime.
    pub fn ensure(&self, machine: &str) -> Result<Attachment, NetworkError> {
        let netns = self.netns_name(machine);
        if let Some(slot) = self.lock().get(&netns).copied() {
            if Path::new("/run/netns").join(&netns).exists() {
                return Ok(self.attachment(netns, slot));
            }
        }
        // Other platforms on this host may draw from the same pool: a slot is free when no
        // interface of the host holds an address in it, checked and taken under a lock all
        // of them take.
        let _host_wide = host_lock()?;
        let on_host = host_addresses();
        let slot = {
            let mut slots = self.lock();
            let used: std::collections::BTreeSet<u32> = slots.values().copied().collect();
            let slot = (0..self.slots_in_pool())
                .find(|s| {
                    let (host, ns) = self.addresses(*s);
                    !used.contains(s) && !on_host.contains(&host) && !on_host.contains(&ns)
                })
                .ok_or(NetworkError::PoolFull(self.settings.pool))?;
            slots.insert(netns.clone(), slot);
            slot
        };
        let attachment = self.attachment(netns.clone(), slot);
        if let Err(e) = self.make(&attachment) {
            self.remove_netns(&netns);
            self.lock().remove(&netns);
            return Err(e);
        }
        Ok(attachment)
    }

    /// The network `machine` has, if any.
    pub fn get(&self, machine: &str) -> Option<Attachment> {
        let netns = self.netns_name(machine);
        let slot = self.lock().get(&netns).copied()?;
        Some(self.attachment(netns, slot))
    }

    fn attachment(&self, netns: String, slot: u32) -> Attachment {
        let (host_addr, ip_address) = self.addresses(slot);
        Attachment {
            netns,
            host_if: format!("{}{slot:x}", self.if_prefix()),
            host_addr,
            ip_address,
        }
    }

    fn make(&self, a: &Attachment) -> Result<(), NetworkError> {
        // What a process that died half-way through left (only then: each call is a process).
        if Path::new("/sys/class/net").join(&a.host_if).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &a.host_if])
                .stderr(Stdio::null())
                .status();
        }
        self.remove_netns(&a.netns);
        run(
            Command::new("ip").args(["netns", "add", &a.netns]),
            None,
            "making the network namespace",
        )?;
        let tap = crate::vm::TAP_NAME;
        let gid = self.settings.shared_gid;
        let host_side = format!(
            "link add {host_if} type veth peer name veth0 netns {ns}\n\
             addr add {host}/30 dev {host_if}\n\
             link set {host_if} up\n",
            host_if = a.host_if,
            ns = a.netns,
            host = a.host_addr,
        );
        run(
            Command::new("ip").args(["-batch", "-"]),
            Some(&host_side),
            "making the veth pair",
        )?;
        let inside = format!(
            "link set lo up\n\
             addr add {ns_addr}/30 dev veth0\n\
             link set veth0 up\n\
             route add default via {host}\n\
             tuntap add dev {tap} mode tap group {gid}\n\
             link set dev {tap} address {mac}\n\
             addr add 172.31.0.1/24 dev {tap}\n\
             addr add 172.31.0.3/32 dev {tap}\n\
             link set {tap} up\n",
            ns_addr = a.ip_address,
            host = a.host_addr,
            mac = crate::vm::GATEWAY_MAC,
        );
        run(
            Command::new("ip").args(["-n", &a.netns, "-batch", "-"]),
            Some(&inside),
            "setting up the namespace",
        )?;
        self.write_ns_rules(a)
    }

    /// Inside a namespace: forwarding on, the guest masqueraded to the namespace's own
    /// address, its queries to `172.31.0.3` sent to the host's DNS forwarder (TCP to it
    /// reset: only UDP is relayed), and TCP from the host's end of the veth pair to the
    /// namespace's address passed on to the guest (how the platform reaches a guest's ports;
    /// nothing else may open a connection to it).
    fn write_ns_rules(&self, a: &Attachment) -> Result<(), NetworkError> {
        let dns = match self.settings.dns_port {
            Some(port) => format!(
                "ip daddr 172.31.0.3 udp dport 53 dnat to {}:{port}\n\
                 ip daddr 172.31.0.3 tcp dport 53 reject with tcp reset\n",
                a.host_addr
            ),
            None => String::new(),
        };
        let rules = format!(
            "table ip stasis\n\
             delete table ip stasis\n\
             table ip stasis {{\n\
               chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n\
                 {dns}\
                 iifname \"veth0\" ip saddr {host} ip daddr {ns} meta l4proto tcp dnat to {GUEST_ADDR}\n\
               }}\n\
               chain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr 172.31.0.0/24 oifname \"veth0\" masquerade\n\
               }}\n\
             }}\n",
            host = a.host_addr,
            ns = a.ip_address,
        );
        run(
            Command::new("ip").args([
                "netns",
                "exec",
                &a.netns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && nft -f -",
            ]),
            Some(&rules),
            "setting up the namespace's forwarding",
        )
    }

    /// Lets `machine`'s namespace go with its QEMU: once the QEMU is in it, its name is
    /// removed, so the namespace (and with it the veth pair) ends when the QEMU does, however
    /// the QEMU and this process end. Blocking.
    pub fn release(&self, machine: &str) {
        self.remove_netns(&self.netns_name(machine));
    }

    /// Forgets `machine`'s network (its QEMU is gone, or never started: then its namespace's
    /// name goes too). Blocking.
    pub fn remove(&self, machine: &str) {
        let netns = self.netns_name(machine);
        self.remove_netns(&netns);
        self.lock().remove(&netns);
    }

    fn remove_netns(&self, netns: &str) {
        if !Path::new("/run/netns").join(netns).exists() {
            return;
        }
        // Without a process in it, the namespace ends, taking its veth end, and so the pair.
        if let Err(e) = run(
            Command::new("ip").args(["netns", "del", netns]),
            None,
            "removing a network namespace",
        ) {
            if Path::new("/run/netns").join(netns).exists() {
                tracing::warn!(netns, error = %e, "removing a computer's network");
            }
        }
    }

    /// The host's table: what computers' traffic may reach.
    fn write_table(&self) -> Result<(), NetworkError> {
        let table = self.table();
        let ifs = format!("{}*", self.if_prefix());
        let set = |cidrs: &mut dyn Iterator<Item = String>| {
            let all: Vec<String> = cidrs.collect();
            if all.is_empty() {
                String::new()
            } else {
                format!("elements = {{ {} }}", all.join(", "))
            }
        };
        let allow = set(&mut self.settings.egress.allow.iter().map(|c| c.to_string()));
        let deny = set(&mut DEFAULT_DENY
            .iter()
            .map(|s| s.to_string())
            .chain(self.settings.egress.deny.iter().map(|c| c.to_string()))
            .chain(std::iter::once(self.settings.pool.to_string())));
        let dns = match self.settings.dns_port {
            Some(port) => format!("iifname \"{ifs}\" udp dport {port} accept\n"),
            None => String::new(),
        };
        let rules = format!(
            "table inet {table}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
               set allow {{ type ipv4_addr; flags interval; auto-merge; {allow} }}\n\
               set deny {{ type ipv4_addr; flags interval; auto-merge; {deny} }}\n\
               chain input {{ type filter hook input priority filter; policy accept;\n\
                 iifname \"{ifs}\" ct state established,related accept\n\
                 {dns}\
                 iifname \"{ifs}\" meta l4proto tcp reject with tcp reset\n\
                 iifname \"{ifs}\" reject with icmpx admin-prohibited\n\
               }}\n\
               chain forward {{ type filter hook forward priority filter; policy accept;\n\
                 iifname \"{ifs}\" ct state established,related accept\n\
                 iifname \"{ifs}\" meta nfproto ipv6 reject with icmpx admin-prohibited\n\
                 iifname \"{ifs}\" ip daddr @allow accept\n\
                 iifname \"{ifs}\" ip daddr @deny meta l4proto tcp reject with tcp reset\n\
                 iifname \"{ifs}\" ip daddr @deny reject with icmpx admin-prohibited\n\
                 iifname \"{ifs}\" accept\n\
               }}\n\
               chain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr {pool} oifname != \"{ifs}\" masquerade\n\
               }}\n\
             }}\n",
            pool = self.settings.pool,
        );
        run(
            Command::new("nft").args(["-f", "-"]),
            Some(&rules),
            "writing the egress table (nftables)",
        )
    }

    /// Removes the host's table (at a clean shutdown, once every machine is stopped).
    pub fn close(&self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table()])
            .stderr(Stdio::null())
            .status();
    }
}

/// The lock every platform on this host takes to choose a slot (`/run/stasis-networks.lock`).
fn host_lock() -> Result<std::fs::File, NetworkError> {
    let failed = |e: std::io::Error| NetworkError::Command {
        what: "locking /run/stasis-networks.lock".into(),
        detail: e.to_string(),
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/stasis-networks.lock")
        .map_err(failed)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| failed(e.into()))?;
    Ok(f)
}

/// Every IPv4 address on this host's interfaces (the host's own namespace).
fn host_addresses() -> std::collections::HashSet<Ipv4Addr> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

fn run(cmd: &mut Command, input: Option<&str>, what: &str) -> Result<(), NetworkError> {
    let failed = |detail: String| NetworkError::Command {
        what: what.to_string(),
        detail,
    };
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("{e} (apt-get install iproute2 nftables)")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| failed(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_are_read_and_refused_by_name() {
        let c: Cidr = "10.213.7.9/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.213.0.0/16");
        assert!(c.contains(Ipv4Addr::new(10, 213, 255, 1)) && !c.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert_eq!("192.0.2.1".parse::<Cidr>().unwrap().prefix, 32);
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "example/8", "10.0.0.0/x"] {
            assert_eq!(bad.parse::<Cidr>(), Err(BadCidr(bad.to_string())), "{bad}");
        }
    }
}
