//! `[tunnel]` and its `SSH_*` variables: the server, the listen port, the key, the pins, the
//! keepalive and the proxy.

use crate::constants::*;
use crate::proxy::{self, Proxy};

use super::keys::{load_key_base64, load_key_credential, load_key_file, parse_host_keys};
use super::sources::{private_to_group, Layers, Val};
use super::values::{duration_setting, int_port, parse_port};
use super::{ClientKey, TunnelConfig};

/// `None` when the key could not be loaded (the reason is in `errors`).
pub(super) fn settings(l: &Layers, errors: &mut Vec<String>) -> Option<TunnelConfig> {
    let sources = l.sources;
    let (toml_path, toml_name) = (&l.toml_path, &l.toml_name);
    let (env_path, env_name) = (&l.env_path, &l.env_name);
    let unread = l.unread_hint();
    let env_file = &l.env_file;
    let raw = &l.raw;
    let env_val = |names: &[&str]| l.env_val(names);
    let toml_at = |section: &str, key: &str| l.toml_at(section, key);
    let t = &raw.tunnel;

    let host = match env_val(&["SSH_HOST"]).or_else(|| {
        t.host.clone().map(|v| Val {
            value: v,
            at: toml_at("tunnel", "host"),
        })
    }) {
        Some(v) if v.value.trim().is_empty() => {
            errors.push(format!("{}: must not be empty", v.at));
            String::new()
        }
        Some(v) => v.value.trim().to_string(),
        None => {
            errors.push(format!(
                "no tunnel host configured: set [tunnel] host in {toml_name} or SSH_HOST in {env_name}{unread}"
            ));
            String::new()
        }
    };

    let port = match env_val(&["SSH_PORT", "SSH_HOST_PORT"]) {
        Some(v) => parse_port(&v.value, &v.at, errors),
        None => t.port.map_or(DEFAULT_SSH_PORT, |p| {
            int_port(p, &toml_at("tunnel", "port"), errors)
        }),
    };

    let listen_port = match env_val(&["SSH_LISTEN_PORT"]) {
        Some(v) => parse_port(&v.value, &v.at, errors),
        None => match t.listen_port {
            Some(p) => int_port(p, &toml_at("tunnel", "listen_port"), errors),
            None => {
                errors.push(format!(
                    "no listen port configured: set [tunnel] listen_port in {toml_name} or SSH_LISTEN_PORT in {env_name} (Secoda shows it on the tunnel's page){unread}"
                ));
                0
            }
        },
    };

    let user = match env_val(&["SSH_USER"]) {
        Some(v) => v.value,
        None => t.user.clone().unwrap_or_else(|| DEFAULT_USER.to_string()),
    };
    if user.is_empty() {
        errors.push(format!(
            "{}: user must not be empty",
            toml_at("tunnel", "user")
        ));
    }

    let listen_address = t
        .listen_address
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN_ADDRESS.to_string());

    // Key: SSH_KEY_BASE64 or SSH_KEY_CREDENTIAL (environment, then env file) overrides the
    // toml's key_file / key_base64 / key_credential; each place holds exactly one. A file that
    // holds the key itself is refused when every user may read it, as a key file is (copying
    // an example with cp leaves it 0644).
    let from_env_file = |name: &str| !sources.env.contains_key(name);
    let key = match (
        env_val(&["SSH_KEY_BASE64"]),
        env_val(&["SSH_KEY_CREDENTIAL"]),
    ) {
        (Some(b64), Some(cred)) => Err(format!(
            "{} and {} are both set: keep exactly one",
            b64.at, cred.at
        )),
        (Some(v), None) if from_env_file("SSH_KEY_BASE64") => {
            private_to_group(env_path, env_name, "SSH_KEY_BASE64")
                .and_then(|()| load_key_base64(&v.value, &v.at))
                .map(ClientKey::Loaded)
        }
        (Some(v), None) => load_key_base64(&v.value, &v.at).map(ClientKey::Loaded),
        (None, Some(v)) => load_key_credential(&v.value, &v.at, sources),
        (None, None) => match (&t.key_file, &t.key_base64, &t.key_credential) {
            (Some(path), None, None) => {
                load_key_file(path, &toml_at("tunnel", "key_file")).map(ClientKey::Loaded)
            }
            (None, Some(b64), None) => private_to_group(toml_path, toml_name, "key_base64")
                .and_then(|()| load_key_base64(b64, &toml_at("tunnel", "key_base64")))
                .map(ClientKey::Loaded),
            (None, None, Some(name)) => {
                load_key_credential(name, &toml_at("tunnel", "key_credential"), sources)
            }
            (None, None, None) => Err(format!(
                "no private key configured: set [tunnel] key_file, key_base64 or key_credential in {toml_name}, or SSH_KEY_BASE64 in {env_name}{unread}"
            )),
            (file, b64, cred) => {
                let set: Vec<&str> = [
                    file.as_ref().map(|_| "key_file"),
                    b64.as_ref().map(|_| "key_base64"),
                    cred.as_ref().map(|_| "key_credential"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(format!(
                    "{toml_name}: [tunnel] {} are {} set: keep exactly one of key_file, key_base64 and key_credential",
                    set.join(" and "),
                    if set.len() == 2 { "both" } else { "all" }
                ))
            }
        },
    };
    let key = match key {
        Ok(k) => Some(k),
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let host_keys = match env_val(&["SSH_HOST_KEY"]) {
        Some(v) => {
            let lines: Vec<String> = v
                .value
                .split(['\n', ','])
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            parse_host_keys(&lines, &v.at, errors)
        }
        None => match &t.host_keys {
            Some(list) if list.is_empty() => {
                errors.push(format!(
                    "{}: the list is empty; the agent always pins the server's key (remove the key to use Secoda's published one)",
                    toml_at("tunnel", "host_keys")
                ));
                Vec::new()
            }
            Some(list) => parse_host_keys(list, &toml_at("tunnel", "host_keys"), errors),
            None => parse_host_keys(
                &[SECODA_HOST_KEY.to_string()],
                "built-in Secoda host key",
                errors,
            ),
        },
    };

    let keepalive_interval = duration_setting(
        &t.keepalive_interval,
        DEFAULT_KEEPALIVE_INTERVAL,
        &toml_at("tunnel", "keepalive_interval"),
        errors,
    );
    let keepalive_max = match t.keepalive_max {
        None => DEFAULT_KEEPALIVE_MAX,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            errors.push(format!(
                "{}: {n} is out of range (1 to 1000)",
                toml_at("tunnel", "keepalive_max")
            ));
            DEFAULT_KEEPALIVE_MAX
        }
    };

    let standby_retry = duration_setting(
        &t.standby_retry,
        DEFAULT_STANDBY_RETRY,
        &toml_at("tunnel", "standby_retry"),
        errors,
    );
    if !(STANDBY_RETRY_MIN..=STANDBY_RETRY_MAX).contains(&standby_retry) {
        errors.push(format!(
            "{}: {standby_retry:?} is out of range ({STANDBY_RETRY_MIN:?} to {STANDBY_RETRY_MAX:?})",
            toml_at("tunnel", "standby_retry")
        ));
    }

    // A proxy URL may carry a password: the file holding it must then be private, as for a key.
    let proxy = match env_val(&["SSH_PROXY"]).or_else(|| {
        t.proxy.clone().map(|v| Val {
            value: v,
            at: toml_at("tunnel", "proxy"),
        })
    }) {
        None => None,
        Some(v) if v.value.trim().is_empty() => None,
        Some(v) => match Proxy::parse(v.value.trim()) {
            Ok(p) => {
                let file = if sources.env.contains_key("SSH_PROXY") {
                    None
                } else if env_file.contains_key("SSH_PROXY") {
                    Some((&env_path, &env_name, "SSH_PROXY with a password"))
                } else {
                    Some((&toml_path, &toml_name, "[tunnel] proxy with a password"))
                };
                match file {
                    Some((path, name, holds)) if p.has_credentials() => {
                        match private_to_group(path, name, holds) {
                            Ok(()) => Some(p),
                            Err(e) => {
                                errors.push(e);
                                None
                            }
                        }
                    }
                    _ => Some(p),
                }
            }
            Err(e) => {
                errors.push(format!("{}: {e}", v.at));
                None
            }
        },
    };
    if matches!(&proxy, Some(p) if p.scheme == proxy::Scheme::Socks5) && host.len() > 255 {
        errors.push(format!(
            "the tunnel host name is {} bytes; a SOCKS5 proxy takes at most 255",
            host.len()
        ));
    }
    Some(TunnelConfig {
        host,
        port,
        user,
        listen_address,
        listen_port,
        key: key?,
        host_keys,
        keepalive_interval,
        keepalive_max,
        proxy,
        standby_retry,
        pair: t.pair.unwrap_or(false),
        require_post_quantum: t.require_post_quantum.unwrap_or(false),
    })
}
