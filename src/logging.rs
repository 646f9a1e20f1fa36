//! Logging: native journald (with structured fields) when stderr is the journal, plain
//! stderr lines otherwise. The level can change at run time (config reload).

use std::io::Write;

use log::{Log, Metadata, Record};

/// Install the logger. Call once, before anything logs.
pub fn init(level: log::LevelFilter, instance: Option<&str>) {
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let journal = journal.with_syslog_identifier(identifier(instance));
            if journal.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
        log::set_max_level(level);
    }
}

/// `secoda-agent`, or `secoda-agent@NAME` under a template unit's instance.
fn identifier(instance: Option<&str>) -> String {
    match instance {
        Some(name) => format!("secoda-agent@{name}"),
        None => "secoda-agent".to_string(),
    }
}

pub fn set_level(level: log::LevelFilter) {
    log::set_max_level(level);
}

/// One line per record: `LEVEL message`, no colour, no timestamp (journald and
/// most collectors add their own).
struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        // Libraries' chatter only from warnings up; our own messages at the chosen level.
        let ours = record.target().starts_with("secoda_agent");
        if !self.enabled(record.metadata()) || (!ours && record.level() > log::Level::Warn) {
            return;
        }
        // The structured fields go to the journal; the message already says it all here.
        let line = format!("{:<5} {}\n", record.level(), record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
