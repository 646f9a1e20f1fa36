//! The documentation against the code: the README stays short, every relative link (and its
//! anchor) resolves, every ERROR_CLASS the code can log has a troubleshooting entry, every
//! `agent.toml` key the code reads is in `agent.toml(5)` and the example config, and every
//! exit code of `status` and of the agent is in `--help` and the man page.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

/// The quoted words after each `marker` in `text`, e.g. `error_class = "x"`.
fn quoted_after(text: &str, marker: &str) -> Vec<String> {
    text.split(marker)
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(rest.split('"').next()?.to_string())
        })
        .collect()
}

/// The body of `fn name` in `text` (to its first line that is a lone closing brace at the
/// function's indentation).
fn function<'a>(text: &'a str, name: &str) -> &'a str {
    let start = text
        .find(&format!("fn {name}("))
        .unwrap_or_else(|| panic!("no fn {name}"));
    let rest = &text[start..];
    let end = rest
        .find("\n}\n")
        .or_else(|| rest.find("\n    }\n"))
        .unwrap();
    &rest[..end]
}

/// Every ERROR_CLASS value the agent can log.
fn error_classes() -> BTreeSet<String> {
    let mut classes = BTreeSet::new();
    for (_, text) in sources(&root().join("src")) {
        classes.extend(quoted_after(&text, "error_class = "));
    }
    // TunnelError::class() and the channel outcomes (channel/mod.rs), logged through a value.
    let error = read("src/error.rs");
    classes.extend(quoted_after(function(&error, "class"), "=> "));
    let channel = read("src/channel/mod.rs");
    classes.extend(quoted_after(function(&channel, "reply_class"), "=> "));
    classes.extend(quoted_after(&channel, "let class = if over_limit {"));
    assert!(classes.len() > 30, "{classes:?}");
    classes
}

#[test]
fn every_error_class_has_a_troubleshooting_entry() {
    let page = read("docs/troubleshooting.md");
    let missing: Vec<String> = error_classes()
        .into_iter()
        .filter(|c| !page.contains(&format!("ERROR_CLASS={c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md has no `ERROR_CLASS=NAME` entry for: {missing:?}"
    );
}

#[test]
fn the_readme_stays_short() {
    let lines = read("README.md").lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines (at most {README_MAX_LINES}): move the detail to docs/"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fence = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        if !fence && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// `(target, line)` of every markdown link `[text](target)` outside code.
fn links(markdown: &str) -> Vec<(String, usize)> {
    let mut fence = false;
    let mut out = Vec::new();
    for (n, line) in markdown.lines().enumerate() {
        if line.starts_with("```") {
            fence = !fence;
        }
        if fence {
            continue;
        }
        for part in line.split("](").skip(1) {
            if let Some(target) = part.split(')').next() {
                out.push((target.to_string(), n + 1));
            }
        }
    }
    out
}

#[test]
fn relative_links_and_their_anchors_resolve() {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let file_path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let shown = format!("{}:{line}: {target}", page.display());
            if !file_path.exists() {
                broken.push(format!("{shown} (no such file)"));
                continue;
            }
            if let Some(fragment) = fragment {
                let target_text = std::fs::read_to_string(&file_path).unwrap_or_default();
                if !anchors(&target_text).contains(fragment) {
                    broken.push(format!("{shown} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `[section] key` for every field of the raw configuration structs (config/sources.rs).
fn config_keys() -> Vec<(String, String)> {
    let text = read("src/config/sources.rs");
    let mut keys = Vec::new();
    for (strukt, section) in [
        ("RawTunnel", "tunnel"),
        ("RawForward", "forward"),
        ("RawLog", "log"),
        ("RawMetrics", "metrics"),
    ] {
        let start = text
            .find(&format!("struct {strukt} {{"))
            .unwrap_or_else(|| panic!("no {strukt}"));
        let body = &text[start..start + text[start..].find("\n}").unwrap()];
        for line in body.lines().skip(1) {
            if let Some(field) = line.trim().strip_prefix("pub(super) ") {
                let name = field.split(':').next().unwrap().trim();
                keys.push((section.to_string(), name.to_string()));
            }
        }
    }
    assert!(keys.len() > 20, "{keys:?}");
    keys
}

#[test]
fn every_config_key_is_in_the_man_page_and_the_example() {
    let man = read("packaging/man/agent.toml.5");
    let example = read("config/agent.toml");
    let mut missing = Vec::new();
    for (section, key) in config_keys() {
        if !man.contains(&format!(".B {key}\n")) {
            missing.push(format!("agent.toml(5) lacks [{section}] {key}"));
        }
        let in_example = example.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
        });
        if !in_example {
            missing.push(format!("config/agent.toml lacks [{section}] {key}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The audit trail's event ids and schema version are an interface: a security team filters
/// on them, so the man page and docs/audit.md say the values the code writes.
#[test]
fn the_audit_schema_in_the_docs_is_the_one_the_code_writes() {
    let code = read("src/audit.rs");
    let man = read("packaging/man/agent.toml.5");
    let page = read("docs/audit.md");
    let ids: Vec<&str> = code
        .lines()
        .filter(|l| l.starts_with("pub const MESSAGE_ID_"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let schema = code
        .lines()
        .find_map(|l| l.strip_prefix("pub const SCHEMA: u32 = "))
        .unwrap()
        .trim_end_matches(';');
    let mut missing = Vec::new();
    for id in &ids {
        for (name, text) in [("agent.toml(5)", &man), ("docs/audit.md", &page)] {
            if !text.contains(id) {
                missing.push(format!("{name} lacks MESSAGE_ID {id}"));
            }
        }
    }
    if !man.contains(&format!("Schema version {schema} ")) {
        missing.push(format!(
            "agent.toml(5) does not say schema version {schema}"
        ));
    }
    if !page.contains(&format!("`AUDIT_SCHEMA` is `{schema}`")) {
        missing.push(format!(
            "docs/audit.md does not say schema version {schema}"
        ));
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// `pub const NAME: u8 = N;` values of `mod exit` in `file`.
fn exit_codes(file: &str) -> Vec<u8> {
    let text = read(file);
    let start = text.find("pub mod exit {").unwrap();
    let body = &text[start..start + text[start..].find("\n}").unwrap()];
    u8_values(body)
}

fn u8_values(body: &str) -> Vec<u8> {
    body.lines()
        .filter_map(|l| l.split(": u8 = ").nth(1))
        .map(|v| v.trim_end_matches(';').trim().parse().unwrap())
        .collect()
}

#[test]
fn every_exit_code_is_in_help_and_the_man_page() {
    let man = read("packaging/man/secoda-agent.8");
    let help = read("src/cli.rs");
    let operating = read("docs/operating.md");
    let mut missing = Vec::new();
    for code in exit_codes("src/status.rs") {
        let word = |text: &str| {
            text.split(|c: char| !c.is_ascii_digit())
                .any(|w| w == code.to_string())
        };
        let status_help = help
            .lines()
            .skip_while(|l| !l.contains("  status "))
            .take(2)
            .collect::<String>();
        if !word(&status_help) {
            missing.push(format!("--help's status line lacks exit {code}"));
        }
        let status_man = man.split(".B status").nth(1).unwrap_or_default();
        let status_man = status_man.split(".TP").next().unwrap_or_default();
        if !word(status_man) {
            missing.push(format!("secoda-agent(8)'s status lacks exit {code}"));
        }
        if !word(&operating) {
            missing.push(format!("docs/operating.md lacks status exit {code}"));
        }
    }
    let exit_status = man.split(".SH EXIT STATUS").nth(1).unwrap();
    let exit_status = exit_status.split(".SH").next().unwrap();
    for code in exit_codes("src/lib.rs") {
        if !exit_status.contains(&format!("{code} ")) {
            missing.push(format!("secoda-agent(8) EXIT STATUS lacks {code}"));
        }
        if !operating.contains(&format!("| {code} |")) {
            missing.push(format!("docs/operating.md's exit table lacks {code}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
