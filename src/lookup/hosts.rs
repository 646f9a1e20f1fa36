//! Names the hosts file knows, answered at once rather than after a turn among the resolver's
//! lookups: a local name must not wait behind hundreds of names whose DNS never answers (a
//! resolver outage while many syncs start), however many distinct names those are.
//!
//! Only where the name service switch consults the hosts file first (`hosts: files ...`,
//! Debian's and RHEL's default): there glibc answers a name in it from the file without
//! asking DNS, so this gives the answer `getaddrinfo` would, without the wait. Elsewhere
//! (no `files` first, or no `hosts:` line: glibc then asks DNS first) every name goes to the
//! resolver as before. Both files are read again when they change.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

const HOSTS: &str = "/etc/hosts";
const NSSWITCH: &str = "/etc/nsswitch.conf";

/// What the two files said, and which versions of them (modification time and size).
struct Known {
    seen: [Option<(SystemTime, u64)>; 2],
    names: HashMap<String, Vec<IpAddr>>,
}

static KNOWN: Mutex<Option<Known>> = Mutex::new(None);

/// `name`'s addresses from the hosts file, where the name service switch reads it first.
pub fn lookup(name: &str) -> Option<Vec<IpAddr>> {
    let seen = [version(Path::new(HOSTS)), version(Path::new(NSSWITCH))];
    let mut known = crate::lock(&KNOWN);
    if known.as_ref().is_none_or(|k| k.seen != seen) {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let names = if files_first(&read(NSSWITCH)) {
            parse_hosts(&read(HOSTS))
        } else {
            HashMap::new()
        };
        *known = Some(Known { seen, names });
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    known.as_ref()?.names.get(&name).cloned()
}

fn version(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Whether nsswitch.conf's `hosts:` line names `files` first.
fn files_first(nsswitch: &str) -> bool {
    nsswitch
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .find_map(|l| l.strip_prefix("hosts:"))
        .and_then(|sources| sources.split_whitespace().next())
        == Some("files")
}

/// Every name of the hosts file with its addresses, in the file's order.
fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let mut fields = line
            .split('#')
            .next()
            .unwrap_or_default()
            .split_whitespace();
        // A scoped address (fe80::1%eth0) does not parse: such a line is left to the resolver.
        let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in fields {
            let addrs = names.entry(name.to_ascii_lowercase()).or_default();
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_file_is_read_as_glibc_reads_it() {
        let names = parse_hosts(
            "127.0.0.1\tlocalhost\n# a comment\n10.0.0.5 db.internal DB # the primary\n\
             fd00::5 db.internal\nfe80::1%eth0 scoped\nnot-an-address nobody\n",
        );
        assert_eq!(names["localhost"], ["127.0.0.1".parse::<IpAddr>().unwrap()]);
        let db: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        assert_eq!(names["db.internal"], db);
        assert_eq!(names["db"], db[..1]);
        assert!(!names.contains_key("scoped") && !names.contains_key("nobody"));
        assert!(!names.contains_key("the"));
    }

    #[test]
    fn only_where_the_hosts_file_comes_first() {
        assert!(files_first("passwd: files\nhosts:          files dns\n"));
        assert!(files_first("hosts: files myhostname dns # RHEL\n"));
        assert!(!files_first("hosts: dns files\n"));
        assert!(!files_first("# hosts: files dns\n"));
        assert!(!files_first(""));
    }
}
