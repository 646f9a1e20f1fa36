//! secoda-agent: keeps a reverse SSH tunnel open to Secoda and serves the SOCKS requests that
//! arrive through it, so Secoda can reach private databases with no inbound port opened.
// The system calls that need it live in sys.rs, the one module that allows it.
#![deny(unsafe_code)]

pub mod accept;
pub mod agent;
pub mod algorithms;
pub mod audit;
pub mod backoff;
pub mod channel;
pub mod cli;
pub mod config;
pub mod connect;
pub mod constants;
pub mod count;
pub mod doctor;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod handover;
pub mod limits;
pub mod logging;
pub mod lookup;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rsa_sign;
pub mod session;
pub mod socks;
pub mod spill;
pub mod status;
pub mod supervisor;
pub mod sys;
pub mod systemd;
pub mod telemetry;
pub mod transport;
pub mod tunnel;

/// A mutex's guard, poisoned or not: a panic in one task must not take every later user of
/// the same table or slot down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exit codes (sysexits.h where one fits): the unit uses `RestartPreventExitStatus=78`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 64;
    pub const CONFIG: u8 = 78;
}
