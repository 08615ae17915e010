//! A network namespace joined to the host by a veth pair, for a program that must sit behind a link the
//! test shapes with `tc` (a slow uplink: `tbf`). Needs root: check [`crate::prereq::needs_root`] first.
//!
//! The host end gets `10.211.<n>.1/30`, the namespace end `10.211.<n>.2/30`; `n` comes from the process id
//! and a counter, so parallel tests (and test binaries) get their own subnets. Programs started with
//! [`Netns::command_prefix`] reach the host on [`Netns::host_ip`], and the host reaches them on
//! [`Netns::inner_ip`]. Traffic between the two crosses only the veth pair: nothing leaves the machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace and its veth pair, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_dev: String,
    inner_dev: String,
    subnet: u8,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates the namespace and the veth pair, both ends up, loopback up inside.
    ///
    /// # Errors
    /// The failing `ip` command and what it said (not root, no veth support).
    pub fn create() -> Result<Self, String> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = std::process::id().wrapping_mul(7).wrapping_add(k * 31) % 240;
        let subnet = u8::try_from(id + 10).unwrap_or(10);
        let tag = format!("{}x{k}", std::process::id() % 100_000);
        let ns = Self {
            name: format!("mbt{tag}"),
            host_dev: format!("mbh{tag}"),
            inner_dev: format!("mbi{tag}"),
            subnet,
        };
        ns.setup()?;
        Ok(ns)
    }

    fn setup(&self) -> Result<(), String> {
        let host_cidr = format!("10.211.{}.1/30", self.subnet);
        let inner_cidr = format!("10.211.{}.2/30", self.subnet);
        run(&["ip", "netns", "add", &self.name])?;
        run(&[
            "ip",
            "link",
            "add",
            &self.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &self.inner_dev,
        ])?;
        run(&["ip", "link", "set", &self.inner_dev, "netns", &self.name])?;
        run(&["ip", "addr", "add", &host_cidr, "dev", &self.host_dev])?;
        run(&["ip", "link", "set", &self.host_dev, "up"])?;
        self.exec(&["ip", "addr", "add", &inner_cidr, "dev", &self.inner_dev])?;
        self.exec(&["ip", "link", "set", &self.inner_dev, "up"])?;
        self.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// The host's address on the pair (what a program inside dials to reach a host listener).
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 211, self.subnet, 1))
    }

    /// The namespace's address on the pair (what the host dials to reach a listener inside).
    pub fn inner_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 211, self.subnet, 2))
    }

    /// A free-looking port on [`Self::inner_ip`]: the namespace is new, so any port is free there.
    pub fn inner_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.inner_ip(), port)
    }

    /// The program and leading arguments that run a command inside the namespace
    /// (`ip netns exec <name>`, which execs the command: its pid is the command's).
    pub fn command_prefix(&self) -> (std::path::PathBuf, Vec<String>) {
        (
            "ip".into(),
            vec!["netns".into(), "exec".into(), self.name.clone()],
        )
    }

    /// Shapes the UDP that leaves the namespace (the QUIC uplink to the hub) with a token bucket of `rate`
    /// (as `tc` takes it, e.g. `1mbit`), replacing any earlier shaping. TCP (the site's MQTT clients and
    /// their PUBACKs, when the test reaches the namespace's broker from the host) is not shaped: the slow
    /// link is the uplink, not the factory floor.
    ///
    /// An `htb` root sends UDP to class 1:10, capped at `rate`, whose queue is a `tbf` of the same rate
    /// (its latency bound keeps the kernel's buffer short, as on a real slow link); everything else goes
    /// to class 1:20, effectively unlimited. (This kernel has no `prio` qdisc.)
    ///
    /// # Errors
    /// What `tc` said.
    pub fn limit_uplink(&self, rate: &str) -> Result<(), String> {
        let _ = self.exec(&["tc", "qdisc", "del", "dev", &self.inner_dev, "root"]);
        let dev = self.inner_dev.as_str();
        let tc = |args: &[&str]| {
            let mut all = vec!["tc"];
            all.extend_from_slice(args);
            self.exec(&all)
        };
        tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20",
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate,
            "ceil", rate,
        ])?;
        tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit",
            "quantum", "60000",
        ])?;
        tc(&[
            "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "tbf", "rate", rate,
            "burst", "16kb", "latency", "200ms",
        ])?;
        tc(&[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "protocol", "17", "0xff", "flowid", "1:10",
        ])
    }

    /// `tc -s qdisc` of the namespace's end: bytes sent, dropped and over the limit, for a test's report.
    pub fn uplink_stats(&self) -> String {
        Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tc", "-s", "qdisc", "show", "dev",
            ])
            .args([self.inner_dev.as_str(), "handle", "10:"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    /// Removes the shaping set by [`Self::limit_uplink`].
    ///
    /// # Errors
    /// What `tc` said.
    pub fn unlimit_uplink(&self) -> Result<(), String> {
        self.exec(&["tc", "qdisc", "del", "dev", &self.inner_dev, "root"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the inner end, which deletes the pair.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_dev]);
    }
}
