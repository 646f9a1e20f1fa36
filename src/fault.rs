//! Faults injected on request, for tests only: compiled in with the `fault-injection` feature,
//! which `tests/run-all.sh` turns on and no package build does.

use std::path::PathBuf;
use std::sync::LazyLock;

/// `SECODA_AGENT_FAULT_WEDGE`: a file whose appearance wedges the session.
static WEDGE: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os("SECODA_AGENT_FAULT_WEDGE").map(PathBuf::from));

/// Once the wedge file exists (it is taken away, so this happens once), never return: the
/// session handler blocks for good, as a handler stuck on a lock or a bug would, while the
/// runtime stays healthy.
pub async fn wedge_if_asked() {
    if let Some(path) = WEDGE.as_deref() {
        if std::fs::remove_file(path).is_ok() {
            log::warn!("fault injection: the session's handler now blocks for good");
            std::future::pending::<()>().await;
        }
    }
}
