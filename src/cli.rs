//! The command line. Small enough to parse by hand, which spares a dependency and its build.

use std::ffi::OsString;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: secoda-agent [run] [--config PATH] [--env-file PATH] [--instance NAME] [--log-level LEVEL]
       secoda-agent check-config [--config PATH] [--env-file PATH] [--instance NAME]
       secoda-agent status [--json] [--instance NAME] [--socket PATH]
       secoda-agent doctor [--config PATH] [--env-file PATH] [--instance NAME]
       secoda-agent --version | --help

  run             keep the tunnel up (the default)
  check-config    validate the configuration without connecting; exit 0 or 78
  status          ask the running agent how the tunnel is: exit 0 up, 3 down, 4 not running,
                  5 standing by (one of a pair), 77 not permitted
  doctor          check step by step that this host can run the tunnel; exit 0 if all pass
  --config PATH   TOML configuration (default /etc/secoda-agent/agent.toml, if present)
  --env-file PATH KEY=VALUE file as the Docker image takes it
                  (default /etc/secoda-agent/agent.env, if present)
  --instance NAME one of several tunnels on this host (secoda-agent@NAME.service): the
                  defaults become /etc/secoda-agent/NAME.toml and NAME.env, the status
                  socket /run/secoda-agent-NAME/status.sock
  --json          status as JSON
  --socket PATH   status socket to ask (default: in $RUNTIME_DIRECTORY, else as above)
  --log-level L   error, warn, info, debug or trace (overrides [log] level)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    CheckConfig,
    Status,
    Doctor,
    Version,
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub command: Command,
    pub config: Option<PathBuf>,
    pub env_file: Option<PathBuf>,
    pub log_level: Option<String>,
    pub instance: Option<String>,
    pub json: bool,
    pub socket: Option<PathBuf>,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, String> {
    let mut cli = Cli {
        command: Command::Run,
        config: None,
        env_file: None,
        log_level: None,
        instance: None,
        json: false,
        socket: None,
    };
    let mut command_seen = false;
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not valid UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--config" | "-c" => cli.config = Some(PathBuf::from(value("--config")?)),
            "--env-file" => cli.env_file = Some(PathBuf::from(value("--env-file")?)),
            "--log-level" => cli.log_level = Some(value("--log-level")?),
            "--version" | "-V" => cli.command = Command::Version,
            "--help" | "-h" => cli.command = Command::Help,
            "--instance" => {
                let name = value("--instance")?;
                if !valid_instance(&name) {
                    return Err(format!(
                        "--instance '{name}': use letters, digits, '-', '_' or '.' (not first)"
                    ));
                }
                cli.instance = Some(name);
            }
            "--json" => cli.json = true,
            "--socket" => cli.socket = Some(PathBuf::from(value("--socket")?)),
            "run" | "check-config" | "status" | "doctor" if !command_seen => {
                command_seen = true;
                if cli.command == Command::Run {
                    cli.command = match arg.as_str() {
                        "run" => Command::Run,
                        "check-config" => Command::CheckConfig,
                        "status" => Command::Status,
                        _ => Command::Doctor,
                    };
                }
            }
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    Ok(cli)
}

/// An instance name becomes part of file and directory names: keep it to a safe alphabet.
fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse(
            std::iter::once("secoda-agent")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn commands_and_flags() {
        assert_eq!(p(&[]).unwrap().command, Command::Run);
        let c = p(&["check-config", "--config", "/x.toml", "--env-file=/y.env"]).unwrap();
        assert_eq!(c.command, Command::CheckConfig);
        assert_eq!(c.config, Some(PathBuf::from("/x.toml")));
        assert_eq!(c.env_file, Some(PathBuf::from("/y.env")));
        assert_eq!(p(&["--version"]).unwrap().command, Command::Version);
        assert_eq!(
            p(&["run", "--log-level", "debug"])
                .unwrap()
                .log_level
                .as_deref(),
            Some("debug")
        );
        assert!(p(&["--config"]).is_err());
        assert!(p(&["bogus"]).is_err());
        assert!(p(&["run", "run"]).is_err());
        let s = p(&["status", "--json", "--instance", "eu"]).unwrap();
        assert_eq!(s.command, Command::Status);
        assert!(s.json);
        assert_eq!(s.instance.as_deref(), Some("eu"));
        assert_eq!(p(&["doctor"]).unwrap().command, Command::Doctor);
        assert!(p(&["--instance", "../etc"]).is_err());
        assert!(p(&["--instance", ".hidden"]).is_err());
    }
}
