//! The tests' pinned Python tools (Helm's SDK, hadolint), in a virtualenv
//! outside the clone that `e2e/venv.sh` creates or checks (`.ci/run` calls
//! it too; here it runs once per test process, idempotent and locked).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow};

fn bin_dir() -> Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        crate::installed_path(
            "venv.sh",
            "the tests' Python tools (Helm's SDK, hadolint, the FHIR clients) live in a virtualenv; it needs \
             python3 with venv (Debian: apt-get install python3 python3-venv) and access to the package registry",
        )
        .map_err(|e| format!("{e:#}"))
    });
    found.as_deref().map_err(|e| anyhow!("{e}"))
}

/// A program of the virtualenv: `python`, `hadolint`.
pub fn tool(name: &str) -> Result<PathBuf> {
    Ok(bin_dir()?.join(name))
}
