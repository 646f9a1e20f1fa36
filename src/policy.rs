//! Destination policy: where the server may send us. The agent sits inside the customer's
//! network and takes instructions from the internet, so it decides, after DNS, on the address
//! it is about to connect to (a name cannot smuggle a denied address).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One `allow`/`deny` entry: a network or a host name pattern, optionally limited to ports.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    target: Target,
    ports: Option<(u16, u16)>,
    text: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Net {
        addr: IpAddr,
        prefix: u8,
    },
    /// Lowercase; a leading `*.` matches any subdomain (not the bare domain).
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    /// The agent's own TCP listeners (`[metrics] listen`): never a target, whatever `allow`
    /// says, so Secoda's side cannot reach them through the tunnel.
    own: Vec<SocketAddr>,
}

/// Why a destination was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    DeniedBy(String),
    NotAllowed,
    /// Link-local or a cloud metadata address (see [`is_protected`]).
    Protected,
    /// One of the agent's own listeners.
    Own(SocketAddr),
}

impl Denial {
    /// The rule that denied, as the audit trail names it.
    pub fn rule(&self) -> String {
        match self {
            Denial::DeniedBy(rule) => format!("deny entry \"{rule}\""),
            Denial::NotAllowed => "not in [forward] allow".to_string(),
            Denial::Protected => "metadata default".to_string(),
            Denial::Own(_) => "own listener".to_string(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::DeniedBy(rule) => write!(f, "denied by [forward] deny entry \"{rule}\""),
            Denial::NotAllowed => write!(f, "not in [forward] allow"),
            Denial::Protected => write!(
                f,
                "link-local and cloud metadata addresses are denied unless a [forward] allow entry names the address or its network"
            ),
            Denial::Own(listen) => write!(
                f,
                "is the agent's own listener ([metrics] listen = \"{listen}\"), never a target"
            ),
        }
    }
}

impl Policy {
    /// Parse both lists; errors come back as (key, message) pairs.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Policy, Vec<(&'static str, String)>> {
        let mut errors = Vec::new();
        let mut parse_all = |key: &'static str, list: &[String]| -> Vec<Rule> {
            list.iter()
                .filter_map(|e| match Rule::parse(e) {
                    Ok(r) => Some(r),
                    Err(msg) => {
                        errors.push((key, format!("\"{e}\": {msg}")));
                        None
                    }
                })
                .collect()
        };
        let allow = parse_all("allow", allow);
        let deny = parse_all("deny", deny);
        if errors.is_empty() {
            Ok(Policy {
                allow,
                deny,
                own: Vec::new(),
            })
        } else {
            Err(errors)
        }
    }

    /// The `allow` entries that name one host (no wildcard), with their first port if they
    /// name ports: what `doctor` can try to reach.
    pub fn allowed_hosts(&self) -> Vec<(String, Option<u16>, String)> {
        self.allow
            .iter()
            .filter_map(|r| match &r.target {
                Target::Name(n) if !n.starts_with("*.") => {
                    Some((n.clone(), r.ports.map(|p| p.0), r.text.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Refuse the agent's own listeners as targets (see [`Denial::Own`]).
    pub fn with_own_listeners(mut self, own: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.own = own.into_iter().collect();
        self
    }

    /// Decide for a connection to `ip:port`, asked for as `name` (None when the request
    /// carried an address).
    ///
    /// An IPv6 address that carries an IPv4 address (mapped, NAT64, IPv4-compatible, 6to4) may
    /// reach that IPv4 host, so both are judged: a deny or protection of either refuses, an
    /// allow of either admits.
    pub fn check(&self, name: Option<&str>, ip: IpAddr, port: u16) -> Result<(), Denial> {
        self.decide(name, ip, port).map(|_| ())
    }

    /// As [`Policy::check`], naming the rule that allowed it (for the audit trail).
    pub fn decide(&self, name: Option<&str>, ip: IpAddr, port: u16) -> Result<String, Denial> {
        // 0.0.0.0 and :: connect to this host: judge them as the loopback address they reach.
        let ip = match ip.to_canonical() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };
        let forms: Vec<IpAddr> = match ip {
            IpAddr::V6(v6) => std::iter::once(ip)
                .chain(embedded_v4(v6).map(IpAddr::V4))
                .collect(),
            IpAddr::V4(_) => vec![ip],
        };
        if let Some(own) = self.own.iter().find(|l| is_listener(l, ip, port)) {
            return Err(Denial::Own(*own));
        }
        let name = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let hit = |r: &Rule, ip: IpAddr| r.matches(name.as_deref(), ip, port);
        for &ip in &forms {
            if let Some(rule) = self.deny.iter().find(|r| hit(r, ip)) {
                return Err(Denial::DeniedBy(rule.text.clone()));
            }
            // A name may resolve anywhere, so only an address or network in `allow` opens a
            // protected address.
            if is_protected(ip)
                && !self
                    .allow
                    .iter()
                    .any(|r| matches!(r.target, Target::Net { .. }) && hit(r, ip))
            {
                return Err(Denial::Protected);
            }
        }
        if self.allow.is_empty() {
            return Ok("no [forward] allow list: everything not denied".to_string());
        }
        forms
            .iter()
            .find_map(|&ip| self.allow.iter().find(|r| hit(r, ip)))
            .map(|r| format!("allow entry \"{}\"", r.text))
            .ok_or(Denial::NotAllowed)
    }
}

/// The IPv4 address an IPv6 address carries where a translator or tunnel would deliver to
/// it: NAT64's well-known prefix 64:ff9b::/96 (RFC 6052, also what DNS64 synthesises),
/// IPv4-translated ::ffff:0:0/96 (SIIT), IPv4-compatible ::/96 (deprecated, but routed by some
/// stacks) and 6to4 2002::/16. A NAT64 prefix of the network's own choosing cannot be known
/// here: deny it as an IPv6 network. (IPv4-mapped addresses were already made IPv4.)
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = || Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low()),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low()),
        // :: and ::1 are not IPv4-compatible addresses.
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(low()),
        [0x2002, a, b, ..] => Some(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b))),
        _ => None,
    }
}

/// Whether a connection to `ip:port` would reach `listener`: its own address, or, for one
/// bound to the unspecified address, any address of this host.
fn is_listener(listener: &SocketAddr, ip: IpAddr, port: u16) -> bool {
    if listener.port() != port {
        return false;
    }
    let own = listener.ip().to_canonical();
    if own == ip {
        return true;
    }
    own.is_unspecified() && (ip.is_loopback() || is_local_address(ip))
}

/// Whether `ip` is an address of this host: only those can be bound. Asked only for a
/// connection to the port of a listener on the unspecified address.
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |rules: &[Rule]| {
            rules
                .iter()
                .map(|r| r.text.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.allow.is_empty() {
            write!(f, "allow everything")?;
        } else {
            write!(f, "allow only {}", list(&self.allow))?;
        }
        if !self.deny.is_empty() {
            write!(f, "; deny {}", list(&self.deny))?;
        }
        write!(
            f,
            "; link-local and cloud metadata addresses denied unless allowed by address"
        )
    }
}

/// Where a cloud VM's instance metadata (and the credentials it hands out) can be reached:
/// denied unless an `allow` entry names the address or its network.
fn is_protected(ip: IpAddr) -> bool {
    match ip {
        // 169.254.0.0/16: AWS, GCP, Azure, OpenStack and most others' metadata service.
        IpAddr::V4(v4) => {
            v4.is_link_local()
                // Alibaba Cloud's metadata service.
                || v4 == Ipv4Addr::new(100, 100, 100, 200)
                // Azure's WireServer (VM agent and extension configuration).
                || v4 == Ipv4Addr::new(168, 63, 129, 16)
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                // AWS's metadata service over IPv6 (Nitro instances).
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let s = text.trim();
        if s.is_empty() {
            return Err("empty entry".into());
        }
        // Split off the port part: "[v6]:p", "net/len:p", "name:p"; a bare IPv6 has no port.
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or("missing ']'")?;
            let ports = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("expected ':' after ']'")?),
            };
            (inner, ports)
        } else if s.parse::<IpAddr>().is_ok() {
            (s, None)
        } else if let Some((net, len_port)) = s.split_once('/') {
            match len_port.split_once(':') {
                Some((len, p)) => (&s[..net.len() + 1 + len.len()], Some(p)),
                None => (s, None),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let ports = ports.map(parse_ports).transpose()?;
        let target = if let Some((addr, len)) = host.split_once('/') {
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| format!("\"{addr}\" is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = len
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("\"/{len}\" is not a prefix length (0 to {max})"))?;
            // Addresses are compared as IPv4 once mapped (::ffff:a.b.c.d), so a mapped network
            // becomes the IPv4 network it covers; a prefix shorter than the mapped block
            // would cover other IPv6 addresses too.
            match addr {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    let v4 = v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED);
                    let prefix = prefix.checked_sub(96).ok_or_else(|| {
                        format!("an IPv4-mapped network needs a prefix of /96 or longer (::ffff:{v4}/96 is {v4}/0); write the IPv4 network instead")
                    })?;
                    Target::Net {
                        addr: IpAddr::V4(v4),
                        prefix,
                    }
                }
                _ => Target::Net { addr, prefix },
            }
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            let addr = addr.to_canonical();
            Target::Net {
                addr,
                prefix: if addr.is_ipv4() { 32 } else { 128 },
            }
        } else {
            let name = host.to_ascii_lowercase();
            let body = name.strip_prefix("*.").unwrap_or(&name);
            let valid = !body.is_empty()
                && body.split('.').all(|l| {
                    !l.is_empty()
                        && l.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
            if !valid {
                return Err("expected a CIDR (10.0.0.0/8), an address, or a host name (db.internal, *.db.internal), optionally with :port or :port-port".into());
            }
            Target::Name(name)
        };
        Ok(Rule {
            target,
            ports,
            text: s.to_string(),
        })
    }

    fn matches(&self, name: Option<&str>, ip: IpAddr, port: u16) -> bool {
        if let Some((lo, hi)) = self.ports {
            if port < lo || port > hi {
                return false;
            }
        }
        match &self.target {
            Target::Net { addr, prefix } => in_net(ip, *addr, *prefix),
            Target::Name(pattern) => match (name, pattern.strip_prefix("*.")) {
                (Some(n), Some(suffix)) => {
                    n.len() > suffix.len() && n.ends_with(&format!(".{suffix}"))
                }
                (Some(n), None) => n == pattern,
                (None, _) => false,
            },
        }
    }
}

fn parse_ports(p: &str) -> Result<(u16, u16), String> {
    let bad = || format!("\"{p}\" is not a port or port range (5432, 5432-5439)");
    let (lo, hi) = match p.split_once('-') {
        Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
        None => (p.parse::<u16>(), p.parse::<u16>()),
    };
    match (lo, hi) {
        (Ok(lo), Ok(hi)) if lo <= hi && lo > 0 => Ok((lo, hi)),
        _ => Err(bad()),
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            // `Rule::parse` keeps prefixes within the family; min() keeps this total anyway.
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(allow: &[&str], deny: &[&str]) -> Policy {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Policy::parse(&s(allow), &s(deny)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_allows_all_but_link_local() {
        let pol = Policy::default();
        assert_eq!(pol.check(None, ip("10.1.2.3"), 5432), Ok(()));
        assert_eq!(
            pol.check(None, ip("169.254.169.254"), 80),
            Err(Denial::Protected)
        );
        assert_eq!(
            pol.check(Some("x"), ip("fe80::1"), 80),
            Err(Denial::Protected)
        );
        assert_eq!(
            pol.check(None, ip("::ffff:169.254.1.1"), 80),
            Err(Denial::Protected)
        );
    }

    #[test]
    fn allow_list_with_ports_and_names() {
        let pol = p(
            &[
                "10.0.0.0/8:5432",
                "*.db.internal",
                "[fd00::1]:443",
                "169.254.169.254",
            ],
            &[],
        );
        assert_eq!(pol.check(None, ip("10.9.9.9"), 5432), Ok(()));
        assert_eq!(pol.check(None, ip("10.9.9.9"), 22), Err(Denial::NotAllowed));
        assert_eq!(
            pol.check(Some("a.db.internal"), ip("192.168.1.1"), 1),
            Ok(())
        );
        assert_eq!(
            pol.check(Some("db.internal"), ip("192.168.1.1"), 1),
            Err(Denial::NotAllowed)
        );
        assert_eq!(pol.check(None, ip("fd00::1"), 443), Ok(()));
        assert_eq!(pol.check(None, ip("169.254.169.254"), 80), Ok(()));
    }

    #[test]
    fn deny_wins_and_checks_the_resolved_address() {
        let pol = p(&["*.corp"], &["10.0.0.0/8", "secret.corp:1-1024"]);
        // The name is allowed, but it resolves into a denied network.
        assert!(matches!(
            pol.check(Some("db.corp"), ip("10.0.0.5"), 5432),
            Err(Denial::DeniedBy(_))
        ));
        assert!(pol
            .check(Some("secret.corp"), ip("192.168.0.2"), 22)
            .is_err());
        assert_eq!(
            pol.check(Some("secret.corp"), ip("192.168.0.2"), 5432),
            Ok(())
        );
    }

    #[test]
    fn bad_entries_are_reported() {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let errs =
            Policy::parse(&s(&["10.0.0.0/33", "db:0", "bad host"]), &s(&["[::1"])).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
    }

    #[test]
    fn a_mapped_network_is_the_ipv4_network_it_covers() {
        let pol = p(&["::ffff:10.0.0.0/104"], &[]);
        assert_eq!(pol.check(None, ip("10.200.0.1"), 5432), Ok(()));
        assert_eq!(pol.check(None, ip("::ffff:10.1.1.1"), 5432), Ok(()));
        assert_eq!(
            pol.check(None, ip("192.0.2.1"), 80),
            Err(Denial::NotAllowed)
        );
        assert_eq!(
            pol.check(None, ip("169.254.169.254"), 80),
            Err(Denial::Protected)
        );
        let denied = p(&[], &["::ffff:192.0.2.0/120"]);
        assert!(denied.check(None, ip("192.0.2.7"), 80).is_err());
        assert_eq!(denied.check(None, ip("192.0.3.7"), 80), Ok(()));
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let errs = Policy::parse(&s(&["::ffff:0.0.0.0/64"]), &[]).unwrap_err();
        assert!(errs[0].1.contains("/96 or longer"), "{errs:?}");
    }

    #[test]
    fn cloud_metadata_addresses_are_denied_unless_allowed_by_address() {
        let pol = Policy::default();
        for addr in ["fd00:ec2::254", "100.100.100.200", "168.63.129.16"] {
            assert_eq!(
                pol.check(None, ip(addr), 80),
                Err(Denial::Protected),
                "{addr}"
            );
        }
        // A name in `allow` does not open a protected address it resolves to.
        let by_name = p(&["metadata.internal"], &[]);
        assert_eq!(
            by_name.check(Some("metadata.internal"), ip("169.254.169.254"), 80),
            Err(Denial::Protected)
        );
        assert_eq!(
            by_name.check(Some("metadata.internal"), ip("10.0.0.1"), 80),
            Ok(())
        );
        let by_address = p(&["168.63.129.16", "fd00:ec2::/32"], &[]);
        assert_eq!(by_address.check(None, ip("168.63.129.16"), 80), Ok(()));
        assert_eq!(by_address.check(None, ip("fd00:ec2::254"), 80), Ok(()));
    }

    #[test]
    fn the_unspecified_address_is_judged_as_loopback() {
        let pol = p(&[], &["127.0.0.0/8", "::1"]);
        assert!(matches!(
            pol.check(None, ip("0.0.0.0"), 22),
            Err(Denial::DeniedBy(_))
        ));
        assert!(matches!(
            pol.check(None, ip("::"), 22),
            Err(Denial::DeniedBy(_))
        ));
        assert_eq!(pol.check(None, ip("10.0.0.1"), 22), Ok(()));
    }

    /// NAT64 (and DNS64's answers), IPv4-translated, IPv4-compatible and 6to4 forms of an
    /// address reach that IPv4 address: each is judged as it too.
    #[test]
    fn ipv6_forms_of_an_ipv4_address_are_judged_as_it() {
        let metadata = [
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.169.254",
            "::ffff:0:a9fe:a9fe",
            "::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "64:ff9b::6464:64c8",
        ];
        for addr in metadata {
            assert_eq!(
                Policy::default().check(None, ip(addr), 80),
                Err(Denial::Protected),
                "{addr}"
            );
        }
        let pol = p(&[], &["10.0.0.0/8"]);
        for addr in [
            "64:ff9b::a00:5",
            "::ffff:0:a00:5",
            "::a00:5",
            "2002:a00:5::",
        ] {
            assert!(
                matches!(pol.check(None, ip(addr), 5432), Err(Denial::DeniedBy(_))),
                "{addr}"
            );
        }
        // Other IPv6 addresses carry none, and :: and ::1 are not IPv4-compatible.
        assert_eq!(pol.check(None, ip("2001:db8::a00:5"), 5432), Ok(()));
        assert_eq!(pol.check(None, ip("64:ff9b:1::a00:5"), 5432), Ok(()));
        assert_eq!(pol.check(None, ip("::1"), 5432), Ok(()));
        // An allowed IPv4 network admits its NAT64 form.
        let allow = p(&["192.0.2.0/24"], &[]);
        assert_eq!(allow.check(None, ip("64:ff9b::c000:207"), 443), Ok(()));
        assert_eq!(
            allow.check(None, ip("64:ff9b::c633:6407"), 443),
            Err(Denial::NotAllowed)
        );
    }

    #[test]
    fn the_agents_own_listeners_are_never_targets() {
        let on_loopback =
            p(&["127.0.0.0/8"], &[]).with_own_listeners(["127.0.0.1:9810".parse().unwrap()]);
        for addr in ["127.0.0.1", "::ffff:127.0.0.1", "0.0.0.0"] {
            assert!(
                matches!(on_loopback.check(None, ip(addr), 9810), Err(Denial::Own(_))),
                "{addr}"
            );
        }
        assert_eq!(on_loopback.check(None, ip("127.0.0.1"), 9811), Ok(()));
        let everywhere = Policy::default().with_own_listeners(["[::]:9810".parse().unwrap()]);
        for addr in ["127.0.0.2", "::1", "::"] {
            assert!(
                matches!(everywhere.check(None, ip(addr), 9810), Err(Denial::Own(_))),
                "{addr}"
            );
        }
        // Another host's port of the same number is not the agent's.
        assert_eq!(everywhere.check(None, ip("192.0.2.1"), 9810), Ok(()));
        let e = everywhere.check(None, ip("::1"), 9810).unwrap_err();
        assert!(e.to_string().contains("[metrics] listen"), "{e}");
    }
}
