//! The Helios FHIR Server (hfs) 0.2.7 of the flavor-helios tests, as
//! `e2e/hfs.sh` installs it into the cache: the binary, and beside it
//! `data/search-parameters-r4.json` (HL7's R4 search parameters, which hfs
//! reads from `./data` of its working directory).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow};

/// The hfs binary (installed on first use, once per test process).
pub fn binary() -> Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        crate::installed_path(
            "hfs.sh",
            "the real FHIR server (hfs 0.2.7) comes from ../shared/fhir-server beside the clone (needs \
             xz-utils) or, much slower, from `cargo install helios-hfs`; its search parameters from `npm pack` \
             (Debian: apt-get install xz-utils npm)",
        )
        .map_err(|e| format!("{e:#}"))
    });
    found.as_deref().map_err(|e| anyhow!("{e}"))
}

/// The directory holding `data/search-parameters-r4.json`: hfs's working
/// directory in the tests.
pub fn search_parameters_dir() -> Result<PathBuf> {
    let dir = binary()?.parent().ok_or_else(|| anyhow!("hfs binary without a directory"))?.to_owned();
    let params = dir.join("data/search-parameters-r4.json");
    if !params.is_file() {
        return Err(anyhow!("{} is missing: run `bash e2e/hfs.sh`", params.display()));
    }
    Ok(dir)
}
