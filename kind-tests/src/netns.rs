//! The network fabric of the end-to-end suite: one Linux network namespace per pod, all
//! attached by veth pairs to a bridge in the host namespace, pod IPs in two zone subnets.
//!
//! Layout of fabric `n` of test process `pid`: the bridge holds `10.S.2n.1/23` and
//! `10.S.2n+1.1/23` (`S = 100 + pid % 100`); zone-a pods get `10.S.2n.X`, zone-b pods
//! `10.S.2n+1.X`, all on one /23 so that they reach each other directly over the bridge (no
//! IP forwarding in the host). The host side (the delay proxies) listens on the zone's
//! gateway address; what every pod uses (the routing table's etcd) listens on the fabric's
//! service address `10.S.255.n`, a /32 of the host outside both zones that pods reach
//! through their default route, as a Service's ClusterIP. A partition is a blackhole route
//! for the other zone's /24 in every pod namespace, so it cuts pods from pods and leaves
//! each zone its gateway and the service address.
//!
//! Names carry the test process's pid (`ferry-e2e-<pid>-<n>-<pod>`, links `fe<pid hex>…`)
//! so that parallel tests and processes never collide, and so that [`Fabric::new`] can
//! delete what a killed run left behind (names whose pid is gone). Dropping a [`Fabric`]
//! deletes its namespaces and bridge, also when a test panics. Processes started with
//! [`Fabric::command`] get `SIGKILL` when the test process dies (`setpriv --pdeathsig`).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, Result, bail, ensure};

/// Prefix of every namespace the suite creates.
const NETNS_PREFIX: &str = "ferry-e2e-";
/// Prefix of every link the suite creates in the host namespace.
const LINK_PREFIX: &str = "fe";
/// The sidecar's peer port (the members' address port).
pub const PEER_PORT: u16 = 7710;

/// Fabric numbers handed out in this process (one /23 each).
static NEXT_FABRIC: AtomicU8 = AtomicU8::new(1);

/// A zone of the fabric: `zone-a` or `zone-b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Zone {
    A,
    B,
}

impl Zone {
    /// The `topology.kubernetes.io/zone` value.
    pub fn label(self) -> &'static str {
        match self {
            Zone::A => "zone-a",
            Zone::B => "zone-b",
        }
    }

    /// The zone of a label (`zone-a` or `zone-b`).
    pub fn from_label(label: &str) -> Result<Self> {
        match label {
            "zone-a" => Ok(Zone::A),
            "zone-b" => Ok(Zone::B),
            other => bail!("zone {other:?}: the fabric has zone-a and zone-b"),
        }
    }

    fn other(self) -> Self {
        match self {
            Zone::A => Zone::B,
            Zone::B => Zone::A,
        }
    }
}

/// One pod's network namespace.
#[derive(Debug, Clone)]
pub struct NetPod {
    pub netns: String,
    pub zone: Zone,
    pub ip: Ipv4Addr,
    host_link: String,
}

/// A bridge and the pod namespaces on it; deleted on drop.
#[derive(Debug)]
pub struct Fabric {
    pid: u32,
    number: u8,
    second_octet: u8,
    bridge: String,
    pods: Mutex<Vec<NetPod>>,
    next_host: Mutex<[u8; 2]>,
    /// Index of the next veth (never reused, so a recreated pod gets a fresh link name).
    next_link: AtomicU8,
}

impl Fabric {
    /// Checks for root, `ip netns` and `iptables` (failing with a clear message, never
    /// skipping), deletes leftovers of dead test processes, and creates a bridge.
    pub fn new() -> Result<Self> {
        preflight()?;
        remove_stale();
        let pid = std::process::id();
        let number = NEXT_FABRIC.fetch_add(1, Ordering::Relaxed);
        ensure!(number < 127, "more than 126 fabrics in one test process");
        let second_octet = 100 + u8::try_from(pid % 100).unwrap_or(0);
        let bridge = format!("{LINK_PREFIX}{pid:x}b{number:x}");
        let fabric = Self {
            pid,
            number,
            second_octet,
            bridge: bridge.clone(),
            pods: Mutex::new(Vec::new()),
            next_host: Mutex::new([10, 10]),
            next_link: AtomicU8::new(0),
        };
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        for zone in [Zone::A, Zone::B] {
            let gw = format!("{}/23", fabric.gateway(zone));
            run("ip", &["addr", "add", &gw, "dev", &bridge])?;
        }
        let service = format!("{}/32", fabric.service_ip());
        run("ip", &["addr", "add", &service, "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        Ok(fabric)
    }

    /// The host's address on the bridge in `zone`'s subnet: where pods of that zone reach
    /// host-side services (etcd, proxies).
    pub fn gateway(&self, zone: Zone) -> Ipv4Addr {
        Ipv4Addr::new(10, self.second_octet, self.third_octet(zone), 1)
    }

    /// The host's address that every pod reaches, whatever its zone and also while the
    /// zones are partitioned: where host-side services all pods use listen.
    pub fn service_ip(&self) -> Ipv4Addr {
        // Fabric numbers stay below 127, so zone subnets end at 10.S.253.0/24.
        Ipv4Addr::new(10, self.second_octet, 255, self.number)
    }

    fn third_octet(&self, zone: Zone) -> u8 {
        2 * self.number + u8::from(zone == Zone::B)
    }

    /// `zone`'s subnet, `10.S.T.0/24`.
    pub fn subnet(&self, zone: Zone) -> String {
        format!("10.{}.{}.0/24", self.second_octet, self.third_octet(zone))
    }

    /// Creates a namespace for pod `name` in `zone` with a new IP, attached to the bridge.
    pub fn add_pod(&self, name: &str, zone: Zone) -> Result<NetPod> {
        let host = {
            let mut next = lock(&self.next_host);
            let slot = &mut next[usize::from(zone == Zone::B)];
            ensure!(*slot < 250, "out of addresses in {}", zone.label());
            *slot += 1;
            *slot - 1
        };
        let ip = Ipv4Addr::new(10, self.second_octet, self.third_octet(zone), host);
        let index = self.next_link.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{NETNS_PREFIX}{}-{}-{name}", self.pid, self.number);
        let host_link = format!("{LINK_PREFIX}{:x}v{:x}i{index:x}", self.pid, self.number);
        let pod = NetPod {
            netns: netns.clone(),
            zone,
            ip,
            host_link: host_link.clone(),
        };
        // Recorded first, so that drop removes whatever part of it got created.
        lock(&self.pods).push(pod.clone());
        run("ip", &["netns", "add", &netns])?;
        run(
            "ip",
            &[
                "link", "add", &host_link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        run("ip", &["link", "set", &host_link, "master", &self.bridge])?;
        run("ip", &["link", "set", &host_link, "up"])?;
        let cidr = format!("{ip}/23");
        self.exec(&pod, "ip", &["addr", "add", &cidr, "dev", "eth0"])?;
        self.exec(&pod, "ip", &["link", "set", "eth0", "up"])?;
        self.exec(&pod, "ip", &["link", "set", "lo", "up"])?;
        let gw = self.gateway(zone).to_string();
        self.exec(&pod, "ip", &["route", "add", "default", "via", &gw])?;
        Ok(pod)
    }

    /// Deletes a pod's namespace (its veth goes with it). Its processes must be gone.
    pub fn remove_pod(&self, pod: &NetPod) -> Result<()> {
        lock(&self.pods).retain(|p| p.netns != pod.netns);
        run("ip", &["netns", "delete", &pod.netns])
    }

    /// A command that runs `program` inside `pod`'s namespace and is killed if the test
    /// process dies.
    pub fn command(&self, pod: &NetPod, program: &std::path::Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &pod.netns,
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
            ])
            .arg(program)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs a short command inside `pod`'s namespace and checks its exit status.
    pub fn exec(&self, pod: &NetPod, program: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["netns", "exec", &pod.netns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Cuts zone-a from zone-b: every pod gets a blackhole route for the other zone's
    /// subnet (both zones keep their gateway, so etcd stays reachable).
    pub fn partition_zones(&self) -> Result<()> {
        for pod in lock(&self.pods).clone() {
            let other = self.subnet(pod.zone.other());
            self.exec(&pod, "ip", &["route", "add", "blackhole", &other])?;
        }
        Ok(())
    }

    /// Removes the partition of [`Fabric::partition_zones`].
    pub fn heal_zones(&self) -> Result<()> {
        for pod in lock(&self.pods).clone() {
            let other = self.subnet(pod.zone.other());
            self.exec(&pod, "ip", &["route", "del", "blackhole", &other])?;
        }
        Ok(())
    }

    /// Drops `probability` of the packets of peer connections (those first sent to port
    /// [`PEER_PORT`], both directions) in and out of every pod: iptables `statistic`.
    pub fn add_peer_loss(&self, probability: f64) -> Result<()> {
        let p = format!("{probability}");
        let port = PEER_PORT.to_string();
        for pod in lock(&self.pods).clone() {
            for chain in ["INPUT", "OUTPUT"] {
                #[rustfmt::skip]
                let args = [
                    "-A", chain, "-p", "tcp", "-m", "conntrack", "--ctorigdstport", &port,
                    "-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP",
                ];
                self.exec(&pod, "iptables", &args)?;
            }
        }
        Ok(())
    }

    /// Packets dropped so far by the rules of [`Fabric::add_peer_loss`], over all pods
    /// (the iptables counters), so a test can tell the loss really happened.
    pub fn peer_loss_drops(&self) -> Result<u64> {
        let mut drops = 0;
        for pod in lock(&self.pods).clone() {
            for chain in ["INPUT", "OUTPUT"] {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", &pod.netns, "iptables", "-L", chain, "-v", "-n", "-x",
                    ])
                    .output()
                    .context("running iptables -L")?;
                ensure!(out.status.success(), "iptables -L {chain} in {}", pod.netns);
                drops += String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("DROP") && l.contains("statistic"))
                    .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        Ok(drops)
    }

    /// Removes the loss of [`Fabric::add_peer_loss`].
    pub fn clear_peer_loss(&self) -> Result<()> {
        for pod in lock(&self.pods).clone() {
            self.exec(&pod, "iptables", &["-F", "INPUT"])?;
            self.exec(&pod, "iptables", &["-F", "OUTPUT"])?;
        }
        Ok(())
    }

    /// Sends `from`'s new connections to `to`'s peer port through `via` (a proxy on the
    /// host, e.g. a delay proxy that forwards to `to`): an iptables DNAT in `from`.
    pub fn redirect_peer(
        &self,
        from: &NetPod,
        to: Ipv4Addr,
        via: std::net::SocketAddr,
    ) -> Result<()> {
        let (dst, port, target) = (to.to_string(), PEER_PORT.to_string(), via.to_string());
        #[rustfmt::skip]
        let args = [
            "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", &dst, "--dport", &port,
            "-j", "DNAT", "--to-destination", &target,
        ];
        self.exec(from, "iptables", &args)
    }

    /// The pods on the fabric now.
    pub fn pods(&self) -> Vec<NetPod> {
        lock(&self.pods).clone()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for pod in lock(&self.pods).drain(..) {
            let _ = quiet("ip", &["netns", "delete", &pod.netns]);
            let _ = quiet("ip", &["link", "delete", &pod.host_link]);
        }
        let _ = quiet("ip", &["link", "delete", &self.bridge]);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails with a clear message unless the suite can build its network.
fn preflight() -> Result<()> {
    // `/proc/self` belongs to the effective user.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
    ensure!(
        euid == 0,
        "the end-to-end suite creates network namespaces and needs root (CI runs it as root; \
         run `sudo -E cargo test -p ferry-kind-tests`)"
    );
    for (tool, args) in [
        ("ip", &["netns", "list"][..]),
        ("iptables", &["--version"][..]),
        ("setpriv", &["--version"][..]),
        ("unshare", &["--version"][..]),
        ("mount", &["--version"][..]),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ensure!(
            ok,
            "`{tool}` is missing or fails: the end-to-end suite needs iproute2, iptables and \
             util-linux (`setpriv`, `unshare`, `mount`; `kind-tests/control-plane.sh install` \
             installs them)"
        );
    }
    Ok(())
}

/// Deletes namespaces and links left by test processes that no longer run.
fn remove_stale() {
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            if rest.split('-').next().is_some_and(dead) {
                let _ = quiet("ip", &["netns", "delete", name]);
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            let Some(rest) = name.strip_prefix(LINK_PREFIX) else {
                continue;
            };
            let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            let tail = &rest[hex.len()..];
            if !(tail.starts_with('b') || tail.starts_with('v')) {
                continue;
            }
            if u32::from_str_radix(&hex, 16).is_ok_and(|pid| dead(&pid.to_string())) {
                let _ = quiet("ip", &["link", "delete", name]);
            }
        }
    }
}

/// Runs a command and fails with its standard error unless it succeeds.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn quiet(program: &str, args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}
