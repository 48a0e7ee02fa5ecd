//! The resources in `examples/`: the valid ones a platform engineer copies,
//! and `examples/invalid/`, each of which states in its header who refuses
//! it and which field the refusal must name:
//!
//! ```yaml
//! # refused-by: schema        (the API server's OpenAPI schema) or `cel`
//! # expect-field: spec.server.replicas
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Who refuses an invalid example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// The structural schema (types, enums, ranges, patterns, required):
    /// enforced by every supported API server.
    Schema,
    /// An `x-kubernetes-validations` rule: enforced by API servers that
    /// evaluate CEL (1.25+); v1.20 drops the rules, so the unit tests
    /// evaluate them instead.
    Cel,
}

/// One example file (one resource).
#[derive(Debug, Clone)]
pub struct Example {
    pub path: PathBuf,
    pub object: Value,
    /// For invalid examples: who refuses it and the field it must name.
    pub refusal: Option<(RefusedBy, String)>,
}

impl Example {
    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// The repository's `examples/` directory.
pub fn examples_dir() -> PathBuf {
    crate::crate_dir().join("..").join("examples")
}

/// Every valid example, sorted by file name.
pub fn valid() -> Result<Vec<Example>> {
    load_dir(&examples_dir(), false)
}

/// Every example in `examples/invalid/`, sorted by file name.
pub fn invalid() -> Result<Vec<Example>> {
    load_dir(&examples_dir().join("invalid"), true)
}

fn load_dir(dir: &Path, invalid: bool) -> Result<Vec<Example>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no .yaml examples in {}", dir.display());
    }
    paths.into_iter().map(|p| load(&p, invalid)).collect()
}

fn load(path: &Path, invalid: bool) -> Result<Example> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let object: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: not one YAML resource", path.display()))?;
    let refusal = if invalid {
        let by = match header(&text, "refused-by") {
            Some("schema") => RefusedBy::Schema,
            Some("cel") => RefusedBy::Cel,
            other => bail!("{}: header `# refused-by: schema|cel` missing or wrong ({other:?})", path.display()),
        };
        let field = header(&text, "expect-field")
            .with_context(|| format!("{}: header `# expect-field: <path>` missing", path.display()))?;
        Some((by, field.to_owned()))
    } else {
        None
    };
    Ok(Example { path: path.to_owned(), object, refusal })
}

fn header<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
        .next()
}

/// Leaves of `expected` that `actual` lacks or holds differently, as paths.
/// Used to prove that nothing in an example was silently pruned (unknown
/// fields) or changed; `actual` may hold more (server defaults).
pub fn missing_leaves(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    Some(av) => missing_leaves(v, av, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                missing_leaves(ev, av, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(e), Value::Number(a)) if e.as_f64() == a.as_f64() => {}
        (e, a) if e == a => {}
        (e, a) => out.push(format!("{path}: {e} became {a}")),
    }
}
