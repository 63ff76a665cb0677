//! Computers' networks on this host: each machine gets a network namespace of its own
//! (`/run/netns/stasis-<tag>-n<slot>`, a few made ahead of need), which its confined QEMU
//! joins. Inside, the tap
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
//! the QEMU or the platform. Everything is made with `ip` and `nft` (iproute2, nftables), in
//! three batched calls; a platform restarted while QEMUs run takes their networks back from the
//! names their QEMUs joined ([`Networks::adopt`]).

use crate::vm::GUEST_ADDR;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

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

/// A computer's own egress rules, which narrow the platform's policy and never widen it:
/// the first rule that matches decides (an allowed packet still meets the platform's
/// policy); a packet none matches is let on if `default_allow`, else refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ComputerPolicy {
    pub rules: Vec<PolicyRule>,
    pub default_allow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub allow: bool,
    pub destination: Cidr,
    /// None: TCP, UDP and everything else.
    pub protocol: Option<Protocol>,
    /// Destination port ranges, inclusive (empty: every port).
    pub ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl ComputerPolicy {
    /// The rules of chain `chain` of table `table` (nft commands, one a line).
    fn nft_rules(&self, table: &str, chain: &str) -> String {
        let mut out = String::new();
        let mut add = |rule: String| out.push_str(&format!("add rule inet {table} {chain} {rule}\n"));
        let refuse = |m: &str, p: Option<Protocol>| match p {
            Some(Protocol::Tcp) => vec![format!("{m} reject with tcp reset")],
            Some(Protocol::Udp) => vec![format!("{m} reject with icmpx admin-prohibited")],
            None => vec![
                format!("{m} meta l4proto tcp reject with tcp reset"),
                format!("{m} reject with icmpx admin-prohibited"),
            ],
        };
        for r in &self.rules {
            let to = format!("ip daddr {}", r.destination);
            let ports = (!r.ports.is_empty()).then(|| {
                let list: Vec<String> = r
                    .ports
                    .iter()
                    .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                    .collect();
                format!("{{ {} }}", list.join(", "))
            });
            let matches: Vec<(String, Option<Protocol>)> = match (r.protocol, ports) {
                (Some(Protocol::Tcp), Some(p)) => vec![(format!("{to} tcp dport {p}"), Some(Protocol::Tcp))],
                (Some(Protocol::Udp), Some(p)) => vec![(format!("{to} udp dport {p}"), Some(Protocol::Udp))],
                (Some(Protocol::Tcp), None) => vec![(format!("{to} meta l4proto tcp"), Some(Protocol::Tcp))],
                (Some(Protocol::Udp), None) => vec![(format!("{to} meta l4proto udp"), Some(Protocol::Udp))],
                (None, Some(p)) => vec![
                    (format!("{to} tcp dport {p}"), Some(Protocol::Tcp)),
                    (format!("{to} udp dport {p}"), Some(Protocol::Udp)),
                ],
                (None, None) => vec![(to, None)],
            };
            for (m, p) in matches {
                if r.allow {
                    add(format!("{m} return"));
                } else {
                    refuse(&m, p).into_iter().for_each(&mut add);
                }
            }
        }
        if !self.default_allow {
            refuse("ip version 4", None).into_iter().for_each(&mut add);
        }
        out
    }
}

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
    /// How many networks are kept made ahead (`--network-ready`), so that a start or restore
    /// takes one at once instead of waiting for `ip` and `nft`; 0: each is made when asked for.
    #[serde(default)]
    pub ready: usize,
}

/// One network, as made: a namespace, its veth pair and tap, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its slot in the pool (its /30); also in its namespace's and interface's names.
    pub slot: u32,
    /// `/run/netns/<netns>`, while it is named (until its QEMU has joined it).
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

#[derive(Default)]
struct State {
    /// Machines' networks, by machine name.
    machines: std::collections::BTreeMap<String, Attachment>,
    /// Networks made ahead, no machine's yet: each namespace held only by its descriptor
    /// here (it has no name), so they end with this process, however it ends.
    ready: Vec<(Attachment, std::os::fd::OwnedFd)>,
    /// A thread is making networks ahead.
    filling: bool,
    /// The platform is shutting down: nothing more is made ahead.
    closed: bool,
    /// Machines' own egress rules, applied whenever their networks are made.
    policies: std::collections::BTreeMap<String, ComputerPolicy>,
    /// Slots whose chain of a computer's own rules is in the host's table.
    applied: std::collections::BTreeSet<u32>,
}

/// This platform's computers' networks on this host.
pub struct Networks {
    settings: NetworkSettings,
    state: Mutex<State>,
    /// Signalled when the thread making networks ahead ends.
    filled: std::sync::Condvar,
}

impl Networks {
    /// Sets up the host's side (forwarding, the egress table) and makes the networks kept
    /// ready. Blocking.
    pub fn open(settings: NetworkSettings) -> Result<Arc<Networks>, NetworkError> {
        let networks = Arc::new(Networks {
            settings,
            state: Mutex::new(State::default()),
            filled: std::sync::Condvar::new(),
        });
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetworkError::Command {
            what: "turning on IPv4 forwarding".into(),
            detail: e.to_string(),
        })?;
        networks.write_table()?;
        // Names a process that died before its QEMU started left, and its networks made
        // ahead: the namespace of a QEMU still running lives on without its name.
        let prefix = networks.netns_prefix();
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                remove_netns(&name);
            }
        }
        // The first ones now, so that a failure shows here (and the platform falls back to
        // user networking) rather than at the first start.
        for _ in 0..networks.settings.ready {
            let made = networks.make_new()?;
            networks.lock().ready.push(made);
        }
        Ok(networks)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots_in_pool(&self) -> u32 {
        let size = 1u64 << (32 - u32::from(self.settings.pool.prefix));
        (size / 4).min(u64::from(u32::MAX)) as u32
    }

    /// The network of slot `slot`: its names and the two ends of its /30.
    fn attachment(&self, slot: u32) -> Attachment {
        let base = u32::from(self.settings.pool.base) + slot * 4;
        Attachment {
            slot,
            netns: format!("{}n{slot:x}", self.netns_prefix()),
            host_if: format!("{}{slot:x}", self.if_prefix()),
            host_addr: Ipv4Addr::from(base + 1),
            ip_address: Ipv4Addr::from(base + 2),
        }
    }

    /// The network of `machine`, which its QEMU is to join (`netns`): its own if it has one
    /// still named, else one made ahead, else a new one. Blocking: call off the async runtime.
    pub fn ensure(self: &Arc<Self>, machine: &str) -> Result<Attachment, NetworkError> {
        let taken = {
            let mut state = self.lock();
            match state.machines.get(machine) {
                Some(a) if netns_exists(&a.netns) => return Ok(a.clone()),
                _ => {}
            }
            state.ready.pop()
        };
        let (a, held) = match taken {
            Some(ready) => ready,
            None => self.make_new()?,
        };
        self.refill();
        // Named now, for its QEMU to join (the name, not `held`, keeps it from here on).
        name_netns(&held, &a.netns)?;
        drop(held);
        self.lock().machines.insert(machine.to_string(), a.clone());
        // Its own rules hold before its QEMU starts.
        let policy = self.lock().policies.get(machine).cloned();
        if let Some(policy) = policy {
            if let Err(e) = self.apply_policy(&a, Some(&policy)) {
                self.remove(machine);
                return Err(e);
            }
        }
        Ok(a)
    }

    /// A new network in a free slot. Other platforms on this host may draw from the same
    /// pool: a slot is free when no interface of the host holds an address in it and it is
    /// none of ours, checked and made under a lock all of them take.
    fn make_new(&self) -> Result<(Attachment, std::os::fd::OwnedFd), NetworkError> {
        let _host_wide = host_lock()?;
        let on_host = host_addresses()?;
        let slot = {
            let state = self.lock();
            let used: std::collections::BTreeSet<u32> = state
                .machines
                .values()
                .chain(state.ready.iter().map(|(a, _)| a))
                .map(|a| a.slot)
                .collect();
            (0..self.slots_in_pool())
                .find(|s| {
                    let a = self.attachment(*s);
                    !used.contains(s) && !on_host.contains(&a.host_addr) && !on_host.contains(&a.ip_address)
                })
                .ok_or(NetworkError::PoolFull(self.settings.pool))?
        };
        let a = self.attachment(slot);
        // Made under its name, then held by a descriptor alone.
        let made = self.make(&a).and_then(|()| {
            std::fs::File::open(Path::new("/run/netns").join(&a.netns))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| NetworkError::Command {
                    what: format!("opening the network namespace {}", a.netns),
                    detail: e.to_string(),
                })
        });
        remove_netns(&a.netns);
        match made {
            Ok(held) => Ok((a, held)),
            Err(e) => {
                remove_link(&a.host_if);
                Err(e)
            }
        }
    }

    /// Makes networks ahead, in a thread of its own, until `ready` are.
    fn refill(self: &Arc<Self>) {
        {
            let mut state = self.lock();
            if state.filling || state.closed || state.ready.len() >= self.settings.ready {
                return;
            }
            state.filling = true;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("stasis-networks".into())
            .spawn(move || loop {
                let made = me.make_new();
                let mut state = me.lock();
                let done = match made {
                    Ok(_) if state.closed => true,
                    Ok(made) => {
                        state.ready.push(made);
                        state.ready.len() >= me.settings.ready
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "making a computer's network ahead");
                        true
                    }
                };
                if done || state.closed {
                    state.filling = false;
                    me.filled.notify_all();
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "making computers' networks ahead");
            self.lock().filling = false;
        }
    }

    /// The network `machine` has, if any.
    pub fn get(&self, machine: &str) -> Option<Attachment> {
        self.lock().machines.get(machine).cloned()
    }

    /// Takes back the network of a machine an earlier process of this platform started,
    /// whose QEMU is still running in it (`netns`, the name its QEMU joined, says the slot):
    /// None if that is not a network of this platform's whose veth is still on the host.
    pub fn adopt(&self, machine: &str, netns: &str) -> Option<Attachment> {
        let slot = netns.strip_prefix(&self.netns_prefix())?.strip_prefix('n')?;
        let slot = u32::from_str_radix(slot, 16)
            .ok()
            .filter(|s| *s < self.slots_in_pool())?;
        let a = self.attachment(slot);
        let here = Path::new("/sys/class/net").join(&a.host_if).exists()
            && host_addresses().is_ok_and(|on_host| on_host.contains(&a.host_addr));
        if !here {
            return None;
        }
        self.lock().machines.insert(machine.to_string(), a.clone());
        Some(a)
    }

    fn make(&self, a: &Attachment) -> Result<(), NetworkError> {
        // What a process that died half-way through left.
        remove_link(&a.host_if);
        remove_netns(&a.netns);
        let host_side = format!(
            "netns add {ns}\n\
             link add {host_if} type veth peer name veth0 netns {ns}\n\
             addr add {host}/30 dev {host_if}\n\
             link set {host_if} up\n",
            host_if = a.host_if,
            ns = a.netns,
            host = a.host_addr,
        );
        run(
            Command::new("ip").args(["-batch", "-"]),
            Some(&host_side),
            "making the network namespace and its veth pair",
        )?;
        let tap = crate::vm::TAP_NAME;
        let gid = self.settings.shared_gid;
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
        let rules = self.ns_rules(a);
        in_netns(&a.netns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| NetworkError::Command {
                what: "turning on forwarding in the namespace".into(),
                detail: e.to_string(),
            })?;
            run(
                Command::new("ip").args(["-batch", "-"]),
                Some(&inside),
                "setting up the namespace",
            )?;
            run(
                Command::new("nft").args(["-f", "-"]),
                Some(&rules),
                "setting up the namespace's forwarding",
            )
        })
    }

    /// Inside a namespace: the guest masqueraded to the namespace's own address, its queries
    /// to `172.31.0.3` sent to the host's DNS forwarder (TCP to it reset: only UDP is
    /// relayed), and TCP from the host's end of the veth pair to the namespace's address
    /// passed on to the guest (how the platform reaches a guest's ports; nothing else may
    /// open a connection to it).
    fn ns_rules(&self, a: &Attachment) -> String {
        let dns = match self.settings.dns_port {
            Some(port) => format!(
                "ip daddr 172.31.0.3 udp dport 53 dnat to {}:{port}\n\
                 ip daddr 172.31.0.3 tcp dport 53 reject with tcp reset\n",
                a.host_addr
            ),
            None => String::new(),
        };
        format!(
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
        )
    }

    /// Lets `machine`'s namespace go with its QEMU: once the QEMU is in it, its name is
    /// removed, so the namespace (and with it the veth pair) ends when the QEMU does, however
    /// the QEMU and this process end. Blocking (briefly: no process is run).
    pub fn release(&self, machine: &str) {
        if let Some(a) = self.get(machine) {
            remove_netns(&a.netns);
        }
    }

    /// Forgets `machine`'s network (its QEMU is gone, or never started: then its namespace's
    /// name goes too, and with it the namespace).
    pub fn remove(&self, machine: &str) {
        let gone = {
            let mut state = self.lock();
            state.policies.remove(machine);
            state.machines.remove(machine)
        };
        if let Some(a) = gone {
            remove_netns(&a.netns);
            if let Err(e) = self.apply_policy(&a, None) {
                tracing::warn!(machine, error = %e, "removing a computer's egress rules");
            }
        }
    }

    /// Sets (Some) or clears (None) `machine`'s own egress rules: at once if it has a
    /// network, and whenever one is made for it. Blocking.
    pub fn set_policy(&self, machine: &str, policy: Option<ComputerPolicy>) -> Result<(), NetworkError> {
        let attached = {
            let mut state = self.lock();
            match &policy {
                Some(p) => state.policies.insert(machine.to_string(), p.clone()),
                None => state.policies.remove(machine),
            };
            state.machines.get(machine).cloned()
        };
        match attached {
            Some(a) => self.apply_policy(&a, policy.as_ref()),
            None => Ok(()),
        }
    }

    /// Writes (or removes) the chain of slot `a`'s own rules, and the jump to it for traffic
    /// from its veth, in one atomic nft transaction.
    fn apply_policy(&self, a: &Attachment, policy: Option<&ComputerPolicy>) -> Result<(), NetworkError> {
        let table = self.table();
        let chain = format!("computer_{:x}", a.slot);
        let was = self.lock().applied.contains(&a.slot);
        let script = match policy {
            None if !was => return Ok(()),
            None => format!(
                "delete element inet {table} policies {{ \"{host_if}\" }}\n\
                 delete chain inet {table} {chain}\n",
                host_if = a.host_if
            ),
            Some(p) => format!(
                "add chain inet {table} {chain}\n\
                 flush chain inet {table} {chain}\n\
                 {rules}\
                 add element inet {table} policies {{ \"{host_if}\" : jump {chain} }}\n",
                rules = p.nft_rules(&table, &chain),
                host_if = a.host_if
            ),
        };
        run(
            Command::new("nft").args(["-f", "-"]),
            Some(&script),
            "writing a computer's egress rules (nftables)",
        )?;
        let mut state = self.lock();
        if policy.is_some() {
            state.applied.insert(a.slot);
        } else {
            state.applied.remove(&a.slot);
        }
        Ok(())
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
               map policies {{ type ifname : verdict; }}\n\
               chain input {{ type filter hook input priority filter; policy accept;\n\
                 iifname \"{ifs}\" ct state established,related accept\n\
                 {dns}\
                 iifname \"{ifs}\" meta l4proto tcp reject with tcp reset\n\
                 iifname \"{ifs}\" reject with icmpx admin-prohibited\n\
               }}\n\
               chain forward {{ type filter hook forward priority filter; policy accept;\n\
                 iifname \"{ifs}\" ct state established,related accept\n\
                 iifname vmap @policies\n\
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

    /// At a clean shutdown, once every machine is stopped: the networks made ahead and the
    /// host's table go.
    pub fn close(&self) {
        let ready = {
            let mut state = self.lock();
            state.closed = true;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while state.filling && std::time::Instant::now() < deadline {
                state = self
                    .filled
                    .wait_timeout(state, std::time::Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::take(&mut state.ready)
        };
        // Their descriptors were all that held them.
        drop(ready);
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Names the namespace `held` holds `/run/netns/<netns>`, as `ip netns add` names a new one:
/// a bind mount of it on an empty file of that name.
fn name_netns(held: &std::os::fd::OwnedFd, netns: &str) -> Result<(), NetworkError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |detail: String| NetworkError::Command {
        what: format!("naming the network namespace {netns}"),
        detail,
    };
    let path = Path::new("/run/netns").join(netns);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| failed(e.to_string()))?;
    let from =
        std::ffi::CString::new(format!("/proc/self/fd/{}", held.as_raw_fd())).map_err(|e| failed(e.to_string()))?;
    let to = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| failed(e.to_string()))?;
    // SAFETY: mount reads two NUL-terminated paths that live across the call (no file system
    // type or data for a bind mount); on failure nothing is mounted.
    let rc = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&path);
        return Err(failed(e.to_string()));
    }
    Ok(())
}

fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// Removes a namespace's name as `ip netns del` does (the bind mount that holds it, then the
/// file): without a process in it, the namespace ends, taking its veth end, and so the pair.
fn remove_netns(netns: &str) {
    let path = Path::new("/run/netns").join(netns);
    if !path.exists() {
        return;
    }
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 reads a NUL-terminated path that lives across the call; a failure
        // (not mounted) leaves nothing to undo.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if let Err(e) = std::fs::remove_file(&path) {
        if path.exists() {
            tracing::warn!(netns, error = %e, "removing a computer's network");
        }
    }
}

/// Removes a host interface if it is there.
fn remove_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `f` on a thread of its own inside the network namespace `/run/netns/<netns>` (what
/// it writes under /proc/sys/net, and the processes it starts, are the namespace's).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T, NetworkError> + Send) -> Result<T, NetworkError> {
    let failed = |detail: String| NetworkError::Command {
        what: format!("entering the network namespace {netns}"),
        detail,
    };
    let file = std::fs::File::open(Path::new("/run/netns").join(netns)).map_err(|e| failed(e.to_string()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Only this thread moves, and it ends with `f`.
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| failed(e.to_string()))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(failed("the thread panicked".into())))
    })
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

/// Every IPv4 address on this host's interfaces (the calling thread's namespace).
fn host_addresses() -> Result<std::collections::HashSet<Ipv4Addr>, NetworkError> {
    let mut out = std::collections::HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list it allocates, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(NetworkError::Command {
            what: "listing the host's addresses".into(),
            detail: std::io::Error::last_os_error().to_string(),
        });
    }
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs made, alive until freeifaddrs.
        let node = unsafe { &*at };
        if !node.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points at a socket address headed by its family.
            let family = unsafe { (*node.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(node.ifa_addr as *const libc::sockaddr_in) };
                out.insert(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        at = node.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once, after its last use.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
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
