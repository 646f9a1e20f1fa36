//! Where the configuration comes from: `agent.toml`, the env file, the process environment;
//! read into [`Layers`], which answers "which value wins, and where was it set".

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::constants::*;

use super::{Sources, ENV_KEYS};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) tunnel: RawTunnel,
    #[serde(default)]
    pub(super) forward: RawForward,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    pub(super) host: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) user: Option<String>,
    pub(super) listen_port: Option<i64>,
    pub(super) listen_address: Option<String>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) key_base64: Option<String>,
    pub(super) key_credential: Option<String>,
    pub(super) host_keys: Option<Vec<String>>,
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_max: Option<i64>,
    pub(super) proxy: Option<String>,
    pub(super) standby_retry: Option<String>,
    pub(super) pair: Option<bool>,
    pub(super) require_post_quantum: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForward {
    pub(super) connect_timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) max_connections_per_target: Option<i64>,
    pub(super) connect_rate_per_target: Option<i64>,
    pub(super) max_pending: Option<String>,
    pub(super) max_spill: Option<String>,
    pub(super) stall_timeout: Option<String>,
    pub(super) target_keepalive: Option<String>,
    pub(super) shutdown_timeout: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) deny: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
}

/// A value and the place it came from, e.g. `/etc/secoda-agent/agent.toml: [tunnel] host`.
pub(super) struct Val<T> {
    pub(super) value: T,
    pub(super) at: String,
}

/// The configuration's sources as read: the files' names, the parsed toml, the env file's and
/// the process environment's `SSH_*` values.
pub(super) struct Layers<'a> {
    pub(super) sources: &'a Sources,
    pub(super) toml_path: PathBuf,
    pub(super) toml_name: String,
    pub(super) env_path: PathBuf,
    pub(super) env_name: String,
    pub(super) raw: RawFile,
    pub(super) env_file: BTreeMap<String, String>,
    /// Which sources had anything, for messages and `check-config`.
    pub(super) origin: Vec<String>,
    /// The toml file exists but could not be parsed, so none of its settings count: a
    /// setting then reported missing may well be in it.
    pub(super) toml_unread: bool,
}

impl<'a> Layers<'a> {
    /// Read both files (each optional unless named on the command line); problems go to
    /// `errors`, names in the env file the agent does not read to `warnings`.
    pub(super) fn read(
        sources: &'a Sources,
        errors: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Self {
        let mut origin = Vec::new();
        let (toml_path, toml_required) = match &sources.config {
            Some(p) => (p.clone(), true),
            None => (default_path(sources, DEFAULT_CONFIG_PATH, "toml"), false),
        };
        let (env_path, env_required) = match &sources.env_file {
            Some(p) => (p.clone(), true),
            None => (default_path(sources, DEFAULT_ENV_FILE_PATH, "env"), false),
        };

        let mut raw = RawFile::default();
        let mut toml_unread = false;
        let toml_name = toml_path.display().to_string();
        match read_small_file(&toml_path, toml_required) {
            Ok(Some(text)) => {
                origin.push(toml_name.clone());
                match toml::from_str::<RawFile>(&text) {
                    Ok(r) => raw = r,
                    Err(e) => {
                        toml_unread = true;
                        errors.push(format!("{toml_name}: {}", one_line_toml_error(&e)));
                    }
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("{toml_name}: {e}")),
        }

        let env_name = env_path.display().to_string();
        let mut env_file = BTreeMap::new();
        match read_small_file(&env_path, env_required) {
            Ok(Some(text)) => {
                origin.push(env_name.clone());
                match parse_env_file(&text) {
                    Ok(vars) => env_file = vars,
                    Err(e) => errors.push(format!("{env_name}: {e}")),
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("{env_name}: {e}")),
        }
        if !sources.env.is_empty() {
            origin.push("the process environment".to_string());
        }
        warnings.extend(unknown_env_names(&env_name, &env_file));
        Layers {
            sources,
            toml_path,
            toml_name,
            env_path,
            env_name,
            raw,
            env_file,
            origin,
            toml_unread,
        }
    }

    /// Said after "no ... configured" when the toml could not be read.
    pub(super) fn unread_hint(&self) -> String {
        if self.toml_unread {
            format!(
                " ({} has an error, so none of its settings were read: fix that first)",
                self.toml_name
            )
        } else {
            String::new()
        }
    }

    /// The first of `names` set in the process environment, else in the env file (the toml is
    /// the caller's fallback), with where it came from.
    pub(super) fn env_val(&self, names: &[&str]) -> Option<Val<String>> {
        for n in names {
            if let Some(v) = self.sources.env.get(*n) {
                return Some(Val {
                    value: v.clone(),
                    at: format!("environment variable {n}"),
                });
            }
        }
        for n in names {
            if let Some(v) = self.env_file.get(*n) {
                return Some(Val {
                    value: v.clone(),
                    at: format!("{}: {n}", self.env_name),
                });
            }
        }
        None
    }

    /// `FILE: [section] key`, for messages.
    pub(super) fn toml_at(&self, section: &str, key: &str) -> String {
        format!("{}: [{section}] {key}", self.toml_name)
    }
}

/// The default file, or the instance's file of that kind beside it.
fn default_path(sources: &Sources, default: &str, ext: &str) -> PathBuf {
    let default = PathBuf::from(default);
    match &sources.instance {
        Some(name) => default.with_file_name(format!("{name}.{ext}")),
        None => default,
    }
}

/// `Ok(None)` when an optional file is absent.
fn read_small_file(path: &Path, required: bool) -> Result<Option<String>, String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => return Err(describe_io(&e)),
    };
    if meta.is_dir() {
        return Err("is a directory, expected a file".to_string());
    }
    if meta.len() > MAX_CONFIG_FILE_SIZE {
        return Err(format!(
            "is {} bytes, larger than the {} bytes a configuration file may have",
            meta.len(),
            MAX_CONFIG_FILE_SIZE
        ));
    }
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_FILE_SIZE).read_to_string(&mut text))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => "is not valid UTF-8 text".to_string(),
            _ => describe_io(&e),
        })?;
    Ok(Some(text))
}

pub(super) fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the agent runs as user secoda-agent: make the file readable by group secoda-agent)".to_string()
        }
        _ => format!("cannot be read: {e}"),
    }
}

/// Warnings for names in the env file that the agent does not read. A name is shown only when
/// it looks like a variable name: a line of a pasted key can parse as `NAME=` too, and must
/// not reach the journal.
pub(super) fn unknown_env_names(
    env_name: &str,
    env_file: &BTreeMap<String, String>,
) -> Vec<String> {
    let (named, unnamed): (Vec<&String>, Vec<&String>) = env_file
        .keys()
        .filter(|k| !ENV_KEYS.contains(&k.as_str()))
        .partition(|k| {
            k.len() <= 64
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        });
    let mut warnings: Vec<String> = named
        .iter()
        .map(|k| {
            format!(
                "{env_name}: {k} is not a setting the agent reads (known: {})",
                ENV_KEYS.join(", ")
            )
        })
        .collect();
    if !unnamed.is_empty() {
        warnings.push(format!(
            "{env_name}: {} lines set something that is not an upper-case variable name, which the agent ignores (not shown: it may be pasted key text; a key goes on one line as SSH_KEY_BASE64=...)",
            unnamed.len()
        ));
    }
    warnings
}

/// A configuration file that holds the private key may be read by its group (the agent's),
/// never by every user.
pub(super) fn private_to_group(path: &Path, name: &str, holds: &str) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    if mode & 0o004 == 0 {
        return Ok(());
    }
    Err(format!(
        "{name} holds {holds} and is readable by every user (permissions {mode:04o}): chmod 0640 \"{name}\" (owner root, group secoda-agent), as for a key file"
    ))
}

/// TOML errors span several lines (with a source excerpt); keep the position and the message.
fn one_line_toml_error(e: &toml::de::Error) -> String {
    let full = e.to_string();
    let position = full
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("TOML parse error at "))
        .filter(|_| e.span().is_some());
    match position {
        Some(p) => format!("{p}: {}", e.message().trim()),
        None => e.message().trim().to_string(),
    }
}

/// Docker-compose style `KEY=VALUE` lines: comments, blank lines, `export`, optional quotes.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected KEY=VALUE, found text without '='",
                i + 1
            ));
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            // Not echoed: a line of a pasted key (base64 ends in '=') lands here.
            return Err(format!(
                "line {}: the text before '=' is not a variable name (letters, digits and _ only)",
                i + 1
            ));
        }
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            // An unquoted value ends at an inline " #" comment, as in docker compose.
            v.split(" #").next().unwrap_or(v).trim_end()
        };
        vars.insert(k.to_string(), v.to_string());
    }
    Ok(vars)
}
