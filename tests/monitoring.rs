//! The monitoring files that ship (packaging/monitoring/), checked with the real tools:
//! `promtool` checks the rules and runs their unit tests, and a real Prometheus, started here
//! on loopback with the rules, scrapes a running agent: it sees the tunnel up, sees the
//! tunnel-down alert go pending and then fire once sshd is gone, and evaluates every query of
//! the dashboard against the agent's series.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use secoda_agent_harness::*;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/monitoring")
}

fn rules_file() -> PathBuf {
    monitoring().join("secoda-agent.rules.yml")
}

/// The alert names of the rules file, in order.
fn alerts() -> Vec<String> {
    std::fs::read_to_string(rules_file())
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect()
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool (Debian's prometheus package; tests/run-all.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_every_alert_has_its_unit_test_and_runbook() {
    let names = alerts();
    assert!(names.len() >= 7, "{names:?}");
    let checked = promtool(&["check", "rules", "secoda-agent.rules.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{checked}"
    );
    promtool(&["test", "rules", "secoda-agent.rules.test.yml"]);

    let tests = std::fs::read_to_string(monitoring().join("secoda-agent.rules.test.yml")).unwrap();
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let runbooks =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring.md"))
            .unwrap();
    for name in &names {
        // Both cases for each alert: silent (no alerts expected) and firing (labels expected).
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|c| c.starts_with(&format!("{name}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{name}: no unit test where it stays silent"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{name}: no unit test where it fires"
        );
        let rule = rules
            .split("- alert: ")
            .find(|r| r.starts_with(&format!("{name}\n")))
            .unwrap();
        for key in ["for:", "summary:", "description:", "runbook:"] {
            assert!(rule.contains(key), "{name} has no {key}");
        }
        // The runbook is a heading of docs/monitoring.md: `#### SecodaAgentTunnelDown` is
        // docs/monitoring.md#secodaagenttunneldown.
        let anchor = format!("docs/monitoring.md#{}", name.to_lowercase());
        assert!(rule.contains(&anchor), "{name}: runbook is not {anchor}");
        assert!(
            runbooks.contains(&format!("\n#### {name}\n")),
            "docs/monitoring.md has no runbook section for {name}"
        );
    }
}

/// A Prometheus on loopback, scraping `target` every second as job "secoda-agent", with
/// `rules` (its own copy); killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: secoda-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (tests/run-all.sh installs it)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// `GET /api/v1/PATH` with `query` form-encoded, as JSON.
    fn api(&self, path: &str, query: Option<&str>) -> Option<serde_json::Value> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", "-G"])
            .arg(format!("http://127.0.0.1:{}/api/v1/{path}", self.port));
        if let Some(q) = query {
            curl.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = curl.output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// An instant query's result vector (None while Prometheus is not answering).
    fn query(&self, q: &str) -> Option<Vec<serde_json::Value>> {
        let v = self.api("query", Some(q))?;
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned()
    }

    /// The state of `alert` ("pending", "firing"), if it is active.
    fn alert_state(&self, alert: &str) -> Option<String> {
        let v = self.api("alerts", None)?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == alert)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_sees_the_tunnel_fires_tunnel_down_and_answers_the_dashboard() {
    let mport = free_port();
    let (mut sshd, _agent, listen) =
        tunnel_up(&format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n")).await;
    // Traffic, so that every series the dashboard shows has samples.
    assert_serves(listen).await;

    // The shipped rules, with the tunnel-down alert's wait cut to seconds.
    let shipped = std::fs::read_to_string(rules_file()).unwrap();
    let rules = shipped.replacen("        for: 5m\n", "        for: 4s\n", 1);
    assert_ne!(rules, shipped, "the tunnel-down alert has no `for: 5m`");
    let prometheus = Prometheus::start(&format!("127.0.0.1:{mport}"), &rules);

    let up = until_some(Duration::from_secs(30), || async {
        let r = prometheus.query("secoda_agent_tunnel_up")?;
        (r.len() == 1 && r[0]["value"][1] == "1").then_some(r)
    })
    .await;
    let up = up.expect("Prometheus never saw secoda_agent_tunnel_up == 1");
    assert_eq!(up[0]["metric"]["job"], "secoda-agent");
    assert_eq!(up[0]["metric"]["instance"], format!("127.0.0.1:{mport}"));
    // Two scrapes at least, so that rates and increases have two samples.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_serves(listen).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every query of the dashboard, as Grafana would send it for this agent.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("secoda-agent.dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        let q = expr
            .replace("$instance", &format!("127.0.0.1:{mport}"))
            .replace("$__rate_interval", "1m");
        let result = prometheus.query(&q).expect("Prometheus stopped answering");
        assert!(
            result.iter().any(|s| s["metric"]["instance"]
                .as_str()
                .is_none_or(|i| i == format!("127.0.0.1:{mport}"))),
            "no series for the agent from the dashboard's {expr}"
        );
    }
    assert_eq!(prometheus.alert_state("SecodaAgentTunnelDown"), None);

    // The server goes away: the alert waits its `for:` (pending), then fires.
    sshd.kill();
    let pending = until_some(Duration::from_secs(30), || async {
        (prometheus.alert_state("SecodaAgentTunnelDown").as_deref() == Some("pending"))
            .then_some(())
    })
    .await;
    assert!(pending.is_some(), "SecodaAgentTunnelDown never pending");
    let firing = until_some(Duration::from_secs(30), || async {
        (prometheus.alert_state("SecodaAgentTunnelDown").as_deref() == Some("firing")).then_some(())
    })
    .await;
    assert!(firing.is_some(), "SecodaAgentTunnelDown never fired");
}
