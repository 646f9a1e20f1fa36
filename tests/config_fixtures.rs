//! Configuration cases as files (`tests/config-fixtures/NAME.toml`, an optional `NAME.env`,
//! and `NAME.expect`), checked in process against `config::load`: each `error:` line of the
//! expect file is part of exactly one reported error (` ... ` stands for any text between two
//! parts), and there are no others; likewise each `warning:` line for a valid configuration's
//! warnings; each `summary:` line is part of a valid configuration's `check-config` summary. The keys come
//! from a systemd credential, so the cases need no key material. (tests/config.rs runs the
//! binary end to end: exit codes, files and permissions, secrets.)

use std::collections::BTreeMap;
use std::path::Path;

use secoda_agent::config::{self, Sources};

#[test]
fn every_fixture_loads_as_its_expect_file_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config-fixtures");
    let empty_env = tempfile::NamedTempFile::new().unwrap();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "expect"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 6, "fixtures missing in {}", dir.display());
    for expect in cases {
        let name = expect.file_stem().unwrap().to_string_lossy().to_string();
        let env = dir.join(format!("{name}.env"));
        let sources = Sources {
            config: Some(dir.join(format!("{name}.toml"))),
            env_file: Some(if env.exists() {
                env
            } else {
                empty_env.path().to_path_buf()
            }),
            env: BTreeMap::new(),
            instance: None,
            credentials: None,
            key_required: false,
        };
        let text = std::fs::read_to_string(&expect).unwrap();
        let wanted = |kind: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(kind))
                .map(|l| l.trim().to_string())
                .collect()
        };
        let (errors, warnings, summary) =
            (wanted("error:"), wanted("warning:"), wanted("summary:"));
        match config::load(&sources) {
            Ok(cfg) => {
                assert!(
                    errors.is_empty(),
                    "{name}: loaded, but {errors:?} were expected"
                );
                for want in &warnings {
                    let hits = cfg.warnings.iter().filter(|w| matches(w, want)).count();
                    assert_eq!(hits, 1, "{name}: {hits} warnings contain {want:?}");
                }
                assert_eq!(
                    cfg.warnings.len(),
                    warnings.len(),
                    "{name}: other warnings too: {:?}",
                    cfg.warnings
                );
                let shown = cfg.summary();
                for s in &summary {
                    assert!(
                        shown.contains(s.as_str()),
                        "{name}: summary lacks {s:?}:\n{shown}"
                    );
                }
            }
            Err(e) => {
                assert!(!errors.is_empty(), "{name}: refused:\n{e}");
                for want in &errors {
                    let hits = e.errors.iter().filter(|g| matches(g, want)).count();
                    assert_eq!(hits, 1, "{name}: {hits} errors contain {want:?}:\n{e}");
                }
                assert_eq!(
                    e.errors.len(),
                    errors.len(),
                    "{name}: other errors too:\n{e}"
                );
            }
        }
    }
}

/// Whether `error` holds the parts of `want` (split at ` ... `), in order.
fn matches(error: &str, want: &str) -> bool {
    let mut rest = error;
    for part in want.split(" ... ") {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}
