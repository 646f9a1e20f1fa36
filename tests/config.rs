//! `check-config` and startup against good and bad configurations: exit codes, messages that
//! name the file and key, and no secret in any output.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use base64::Engine;
use secoda_agent_harness::*;

const HOST_KEY: &str = secoda_agent::constants::SECODA_HOST_KEY;

struct Fixture {
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "id_ed25519", "ed25519");
    Fixture { dir, key }
}

impl Fixture {
    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn good_toml(&self) -> String {
        format!(
            "[tunnel]\nhost = \"tunnel.example.com\"\nlisten_port = 10123\nkey_file = \"{}\"\n",
            self.key.display()
        )
    }

    fn key_secret(&self) -> Vec<String> {
        // The base64 body lines of the private key, and the whole file's base64.
        let text = std::fs::read_to_string(&self.key).unwrap();
        let mut secrets: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(String::from)
            .collect();
        secrets.push(base64::engine::general_purpose::STANDARD.encode(text.as_bytes()));
        secrets
    }
}

fn check(args: &[&str], config: Option<&Path>) -> Output {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("check-config");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    // Never let a real /etc/secoda-agent/agent.env or the caller's SSH_* leak into a test.
    cmd.args(["--env-file", "/dev/null"]);
    for k in secoda_agent::config::ENV_KEYS {
        cmd.env_remove(k);
    }
    cmd.args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_good_config_passes_with_a_summary_and_no_secret() {
    let f = fixture();
    let path = f.write("agent.toml", &f.good_toml());
    let out = check(&[], Some(&path));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("tunnel@tunnel.example.com:22"), "{t}");
    assert!(t.contains("0.0.0.0:10123"), "{t}");
    assert!(t.contains("SHA256:"), "{t}");
    for s in f.key_secret() {
        assert!(!t.contains(&s), "secret material in check-config output");
    }
}

fn assert_config_error(toml: &str, needles: &[&str]) {
    let f = fixture();
    let toml = toml.replace("KEY", &f.key.display().to_string());
    let path = f.write("agent.toml", &toml);
    let out = check(&[], Some(&path));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{toml}\n{t}");
    assert!(
        t.contains(&path.display().to_string()) || needles.iter().any(|n| n.contains('/')),
        "file not named: {t}"
    );
    for n in needles {
        assert!(t.contains(n), "missing {n:?} in:\n{t}");
    }
    assert!(!t.contains("panicked"), "{t}");
    for s in f.key_secret() {
        assert!(!t.contains(&s), "secret material in an error");
    }
}

#[test]
fn bad_configs_exit_78_naming_file_key_and_reason() {
    assert_config_error(
        "[tunnel]\nlisten_port = 1\nkey_file = \"KEY\"\n",
        &["no tunnel host configured"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nkey_file = \"KEY\"\n",
        &["no listen port configured"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 70000\nkey_file = \"KEY\"\n",
        &["[tunnel] listen_port", "70000"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\nhots = 1\n",
        &["unknown field `hots`"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\n\nkey_file = \"KEY\n",
        &["line 5"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\nkeepalive_interval = \"soon\"\n[forward]\nmax_pending = \"lots\"\nallow = [\"10.0.0.0/99\"]\n",
        // Every error at once, not just the first.
        &["[tunnel] keepalive_interval", "\"soon\"", "[forward] max_pending", "[forward] allow", "10.0.0.0/99"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\nhost_keys = [\"ssh-ed25519 garbage\"]\n",
        &["[tunnel] host_keys", "not an OpenSSH public key"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\nhost_keys = []\n",
        &["always pins"],
    );
    assert_config_error(
        &format!(
            "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\nkey_base64 = \"{}\"\n",
            "eA=="
        ),
        &["both set"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_base64 = \"%%%notbase64\"\n",
        &["[tunnel] key_base64", "not valid base64"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"/nonexistent/key\"\n",
        &["/nonexistent/key", "does not exist"],
    );
    assert_config_error(
        "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"/tmp\"\n",
        &["/tmp", "is a directory"],
    );
    assert_config_error(
        "[log]\nlevel = \"loud\"\n[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"KEY\"\n",
        &["[log] level", "loud"],
    );
}

#[test]
fn key_problems_are_named_without_showing_the_key() {
    let f = fixture();
    // Readable by others: refused like OpenSSH does, with the fix.
    let open = f.dir.path().join("open_key");
    std::fs::copy(&f.key, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Encrypted with a passphrase.
    let (enc, _) = keygen(f.dir.path(), "enc_key", "ed25519");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-p", "-N", "secret-pass", "-P", "", "-f"])
        .arg(&enc)
        .status()
        .unwrap()
        .success());
    // A public key where the private one belongs.
    let public = f.dir.path().join("id_ed25519.pub");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An RSA key shorter than ring signs (rsa_sign.rs): refused when loaded, not at connect.
    let short = f.dir.path().join("short_rsa");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "1024", "-N", "", "-f"])
        .arg(&short)
        .status()
        .unwrap()
        .success());
    // RSA keys ring cannot sign: longer than 4096 bits, or an exponent under 65537 (openssl
    // makes one; ssh-keygen rewrites it in OpenSSH's format).
    let long = f.dir.path().join("long_rsa");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "rsa", "-b", "4160", "-N", "", "-f"])
        .arg(&long)
        .status()
        .unwrap()
        .success());
    let e35 = f.dir.path().join("e35_rsa");
    assert!(Command::new("openssl")
        .args([
            "genpkey",
            "-quiet",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048"
        ])
        .args(["-pkeyopt", "rsa_keygen_pubexp:35", "-out"])
        .arg(&e35)
        .status()
        .unwrap()
        .success());
    std::fs::set_permissions(&e35, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-p", "-N", "", "-P", "", "-f"])
        .arg(&e35)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success());
    // Garbage in PEM clothes.
    let garbage = f.write(
        "garbage",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    );

    for (key, needle) in [
        (&open, "too open"),
        (&enc, "encrypted with a passphrase"),
        (&public, "this is a public key"),
        (&short, "an RSA key of 1024 bits"),
        (&long, "an RSA key of 4160 bits; the agent signs RSA with constant-time code (ring) that takes keys of 2048 to 4096 bits with a public exponent of at least 65537: generate a new key with ssh-keygen -t ed25519"),
        (&e35, "an RSA key whose public exponent is 35; the agent signs RSA"),
        (&garbage, "could not be parsed"),
    ] {
        let toml = format!(
            "[tunnel]\nhost = \"h\"\nlisten_port = 1\nkey_file = \"{}\"\n",
            key.display()
        );
        let path = f.write("agent.toml", &toml);
        let out = check(&[], Some(&path));
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{t}");
        assert!(
            t.contains(needle) && t.contains("[tunnel] key_file"),
            "missing {needle:?}: {t}"
        );
        for s in f.key_secret() {
            assert!(!t.contains(&s), "secret material in an error");
        }
    }
}

#[test]
fn env_file_and_environment_make_a_config_with_documented_precedence() {
    let f = fixture();
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&f.key).unwrap());
    let env = f.write(
        "agent.env",
        &format!("SSH_HOST=env-file.example\nSSH_PORT=2222\nSSH_LISTEN_PORT=10500\nSSH_KEY_BASE64={b64}\nSSH_HOST_KEY={HOST_KEY}\n"),
    );
    let toml = f.write("agent.toml", &f.good_toml());
    let out = Command::new(agent_bin())
        .args(["check-config", "--config"])
        .arg(&toml)
        .arg("--env-file")
        .arg(&env)
        .env("SSH_PORT", "2200")
        .env_remove("SSH_HOST")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    // env file beats toml (host), the environment beats the env file (port).
    assert!(t.contains("tunnel@env-file.example:2200"), "{t}");
    assert!(t.contains(":10500"), "{t}");
    assert!(!t.contains(&b64));
}

#[test]
fn run_refuses_to_start_on_a_bad_config_with_78() {
    let f = fixture();
    let path = f.write("agent.toml", "[tunnel]\nhost = \"h\"\n");
    let out = Command::new(agent_bin())
        .args(["run", "--env-file", "/dev/null", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out).contains("no listen port configured"));
    // A missing explicit config file is a config error too; bad usage is 64.
    let out = check(&[], Some(Path::new("/nonexistent/agent.toml")));
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out).contains("/nonexistent/agent.toml: does not exist"));
    let out = Command::new(agent_bin()).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn the_shipped_example_configs_are_valid() {
    let f = fixture();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = std::fs::read_to_string(root.join("config/agent.toml"))
        .unwrap()
        .replace("/etc/secoda-agent/id_ed25519", &f.key.display().to_string());
    let path = f.write("agent.toml", &toml);
    let out = check(&[], Some(&path));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&f.key).unwrap());
    let env = std::fs::read_to_string(root.join("config/agent.env"))
        .unwrap()
        .replace("SSH_KEY_BASE64=\n", &format!("SSH_KEY_BASE64={b64}\n"));
    let env_path = f.write("agent.env", &env);
    let out = Command::new(agent_bin())
        .args(["check-config", "--config", "/dev/null", "--env-file"])
        .arg(&env_path)
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("tunnel@tunnel.example.com:22") && t.contains(":10123"),
        "{t}"
    );
}

#[test]
fn a_config_file_holding_the_key_is_refused_when_every_user_may_read_it() {
    let f = fixture();
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read_to_string(&f.key).unwrap().as_bytes());
    let toml = format!(
        "[tunnel]\nhost = \"tunnel.example.com\"\nlisten_port = 10123\nkey_base64 = \"{b64}\"\n"
    );
    let env = format!("SSH_HOST=tunnel.example.com\nSSH_LISTEN_PORT=10123\nSSH_KEY_BASE64={b64}\n");
    for (name, contents, holds) in [
        ("agent.toml", &toml, "holds key_base64"),
        ("agent.env", &env, "holds SSH_KEY_BASE64"),
    ] {
        let path = f.write(name, contents);
        let null = std::path::PathBuf::from("/dev/null");
        let (config, env_file) = if name.ends_with(".toml") {
            (&path, &null)
        } else {
            (&null, &path)
        };
        let run = || {
            let mut cmd = Command::new(agent_bin());
            for k in secoda_agent::config::ENV_KEYS {
                cmd.env_remove(k);
            }
            cmd.arg("check-config")
                .arg("--config")
                .arg(config)
                .arg("--env-file")
                .arg(env_file)
                .output()
                .unwrap()
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let out = run();
        assert_eq!(out.status.code(), Some(0), "0640 is right: {}", text(&out));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(78), "{name} 0644 accepted: {t}");
        assert!(
            t.contains(holds) && t.contains("readable by every user") && t.contains("chmod 0640"),
            "{t}"
        );
        for s in f.key_secret() {
            assert!(!t.contains(&s), "secret material in check-config output");
        }
    }
}
