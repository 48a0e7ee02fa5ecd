//! `fhir-operator render -f FILE...`: the children each FhirEndpoint in the
//! given documents would get, as YAML, offline and byte-for-byte
//! deterministic (for GitOps previews and review). RateLimitTiers and
//! KeyRotationSchedules are looked up among the same documents.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{FhirEndpoint, KeyAlgorithm, KeyRotationSchedule, RateLimitTier};
use crate::discovery::{Capabilities, PdbApi, PodDisruptionBudgetV1beta1};
use jsonwebtoken::jwk::JwkSet;
use k8s_openapi::api::core::v1::ConfigMap;

use crate::fhirendpoint::auth::KeySource;
use crate::fhirendpoint::build::{self, Children, Images, Inputs, KeySource as ApiKeySource};
use crate::fhirendpoint::validate::validate;
use crate::keyrotation::rotation;
use crate::keyrotation::secret::secret_name;
use crate::meta::owner_ref;

/// Arguments of `fhir-operator render`.
#[derive(clap::Args, Debug, Clone)]
pub struct RenderArgs {
    /// YAML files (several documents each are fine) or directories of
    /// them; `-` reads stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace for resources that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Render with placeholders for tiers and key schedules that are not
    /// among the files, instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// Assume the cluster serves monitoring.coreos.com/v1.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub monitoring: bool,
    /// PodDisruptionBudget API of the target cluster.
    #[arg(long, value_enum, default_value = "v1")]
    pub pdb_api: PdbFlag,
    /// nginx image of the gateway.
    #[arg(long, default_value_t = Images::default().gateway)]
    pub gateway_image: String,
    /// Image of the gateway-metrics sidecar.
    #[arg(long, default_value_t = Images::default().metrics)]
    pub sidecar_image: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdbFlag {
    V1,
    V1beta1,
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: document {index}: {message}")]
    Parse { path: String, index: usize, message: String },
    #[error("FhirEndpoint {endpoint}: {message}")]
    Endpoint { endpoint: String, message: String },
}

/// One parsed document and where it came from.
struct Document {
    path: String,
    index: usize,
    value: Value,
}

/// The files to read: a directory stands for its `*.yaml` and `*.yml`
/// files (not recursive), sorted by name.
fn expand(path: &Path) -> Result<Vec<PathBuf>, RenderError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let err = |source| RenderError::Read { path: path.display().to_string(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

fn read(path: &Path) -> Result<(String, String), RenderError> {
    let name = path.display().to_string();
    let text = if name == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(path)
    };
    text.map(|t| (name.clone(), t)).map_err(|source| RenderError::Read { path: name, source })
}

fn documents(path: &str, text: &str) -> Result<Vec<Document>, RenderError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| RenderError::Parse {
            path: path.into(),
            index: index + 1,
            message: e.to_string(),
        })?;
        if !value.is_null() {
            out.push(Document { path: path.into(), index: index + 1, value });
        }
    }
    Ok(out)
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Document) -> Result<T, RenderError> {
    serde_json::from_value(doc.value.clone()).map_err(|e| RenderError::Parse {
        path: doc.path.clone(),
        index: doc.index,
        message: e.to_string(),
    })
}

fn is_kind(doc: &Document, kind: &str) -> bool {
    doc.value["kind"] == kind && doc.value["apiVersion"] == "fhiroperator.io/v1alpha1"
}

/// Renders every FhirEndpoint in `files`.
pub fn render(args: &RenderArgs) -> Result<String, RenderError> {
    let mut docs = Vec::new();
    for arg in &args.files {
        for path in expand(arg)? {
            let (name, text) = read(&path)?;
            docs.extend(documents(&name, &text)?);
        }
    }
    render_documents(&docs, args)
}

fn render_documents(docs: &[Document], args: &RenderArgs) -> Result<String, RenderError> {
    let with_ns = |mut value: Value| {
        if value["metadata"]["namespace"].is_null() {
            value["metadata"]["namespace"] = Value::String(args.namespace.clone());
        }
        value
    };
    let tiers: Vec<RateLimitTier> =
        docs.iter().filter(|d| is_kind(d, "RateLimitTier")).map(typed).collect::<Result<_, _>>()?;
    let schedules: Vec<KeyRotationSchedule> = docs
        .iter()
        .filter(|d| is_kind(d, "KeyRotationSchedule"))
        .map(|d| typed(&Document { value: with_ns(d.value.clone()), path: d.path.clone(), index: d.index }))
        .collect::<Result<_, _>>()?;
    // ConfigMaps (core/v1) among the files: issuers' key sets.
    let config_maps: Vec<ConfigMap> = docs
        .iter()
        .filter(|d| d.value["kind"] == "ConfigMap" && d.value["apiVersion"] == "v1")
        .map(|d| typed(&Document { value: with_ns(d.value.clone()), path: d.path.clone(), index: d.index }))
        .collect::<Result<_, _>>()?;
    let mut endpoints: Vec<FhirEndpoint> = docs
        .iter()
        .filter(|d| is_kind(d, "FhirEndpoint"))
        .map(|d| typed(&Document { value: with_ns(d.value.clone()), path: d.path.clone(), index: d.index }))
        .collect::<Result<_, _>>()?;
    endpoints.sort_by_key(|e| (e.metadata.namespace.clone(), e.metadata.name.clone()));

    let capabilities = Capabilities {
        monitoring: args.monitoring,
        pdb: match args.pdb_api {
            PdbFlag::V1 => PdbApi::V1,
            PdbFlag::V1beta1 => PdbApi::V1beta1,
            PdbFlag::None => PdbApi::NotServed,
        },
    };
    let images = Images { gateway: args.gateway_image.clone(), metrics: args.sidecar_image.clone() };
    let mut out = String::new();
    for ep in &endpoints {
        let id = format!(
            "{}/{}",
            ep.metadata.namespace.as_deref().unwrap_or_default(),
            ep.metadata.name.as_deref().unwrap_or_default()
        );
        let fail = |message: String| RenderError::Endpoint { endpoint: id.clone(), message };
        let v = validate(ep).map_err(|e| fail(e.to_string()))?;
        let tier = match &ep.spec.rate_limit {
            None => None,
            Some(r) => match tiers.iter().find(|t| t.metadata.name.as_deref() == Some(r.tier.as_str())) {
                Some(t) => {
                    crate::ratelimittier::validate(&t.spec).map_err(|e| {
                        fail(format!("RateLimitTier {:?} (spec.rateLimit.tier) is invalid: {e}", r.tier))
                    })?;
                    Some(t.spec.clone())
                }
                None if args.allow_missing => None,
                None => {
                    return Err(fail(format!(
                        "RateLimitTier {:?} (spec.rateLimit.tier) is not among the given files; \
                         add its file, or pass --allow-missing to render with the default limits",
                        r.tier
                    )));
                }
            },
        };
        let mut keys = Vec::new();
        for (i, name) in ep.spec.auth.api_keys.iter().enumerate() {
            let found = schedules.iter().find(|k| {
                k.metadata.name.as_deref() == Some(name.as_str()) && k.metadata.namespace == ep.metadata.namespace
            });
            match found {
                Some(k) if k.spec.algorithm != KeyAlgorithm::ApiKey => {
                    return Err(fail(format!(
                        "spec.auth.apiKeys[{i}]: KeyRotationSchedule {name:?} has algorithm {:?}; the gateway needs api-key",
                        k.spec.algorithm
                    )));
                }
                // The versions in force as the schedule's status says, as
                // the operator computes them: none for a schedule from Git
                // (no status yet), the cluster's for one exported from it.
                Some(k) => keys.push(ApiKeySource {
                    schedule: name.clone(),
                    secret_name: secret_name(k),
                    versions_fingerprint: rotation::fingerprint(&k.status.clone().unwrap_or_default()),
                }),
                None if args.allow_missing => keys.push(ApiKeySource {
                    schedule: name.clone(),
                    secret_name: format!("{name}-keys"),
                    versions_fingerprint: rotation::fingerprint(&Default::default()),
                }),
                None => {
                    return Err(fail(format!(
                        "KeyRotationSchedule {name:?} (spec.auth.apiKeys[{i}]) is not among the given files; \
                         add its file, or pass --allow-missing"
                    )));
                }
            }
        }
        let (tls_secret, tls_fingerprint) = match &ep.spec.tls {
            Some(t) => (t.secret_name.clone(), "provided".to_owned()),
            None => (build::self_issued_tls_name(&v.name), "self-issued".to_owned()),
        };
        let mut jwks = Vec::new();
        let mut notes = String::new();
        for (i, (issuer, source)) in v.auth.iter().flat_map(|a| a.issuers.iter()).enumerate() {
            let field = format!("spec.auth.oauth.issuers[{i}].jwks");
            match source {
                KeySource::ConfigMap { name, key } => {
                    let found = config_maps.iter().find(|c| {
                        c.metadata.name.as_deref() == Some(name.as_str())
                            && c.metadata.namespace == ep.metadata.namespace
                    });
                    let text = found.and_then(|c| c.data.as_ref()?.get(key).cloned());
                    match text {
                        Some(text) => {
                            let (set, _) = crate::fhirendpoint::auth::parse_jwks(text.as_bytes())
                                .map_err(|e| fail(format!("{field}: ConfigMap {name:?} key {key:?}: {e}")))?;
                            jwks.push(set);
                        }
                        None if args.allow_missing => jwks.push(JwkSet { keys: Vec::new() }),
                        None => {
                            return Err(fail(format!(
                                "{field}: ConfigMap {name:?} with key {key:?} is not among the given files; \
                                 add its file, or pass --allow-missing"
                            )));
                        }
                    }
                }
                KeySource::Uri { url, .. } => {
                    notes.push_str(&format!(
                        "# Keys of issuer {:?}: fetched from {url} by the operator in the cluster; not rendered\n",
                        issuer.issuer
                    ));
                    jwks.push(JwkSet { keys: Vec::new() });
                }
            }
        }
        let inputs = Inputs {
            tier,
            keys,
            tls_secret: tls_secret.clone(),
            tls_fingerprint,
            capabilities,
            images: images.clone(),
            jwks,
            audit_public_key: None,
            key_hints: None,
        };
        let children = build::build(&v, owner_ref(ep), &inputs).map_err(|e| fail(e.to_string()))?;
        out.push_str(&format!("# FhirEndpoint {id}\n"));
        out.push_str(&notes);
        if ep.spec.tls.is_none() {
            out.push_str(&format!(
                "# Secret {tls_secret} (kubernetes.io/tls): issued and renewed by the operator in the cluster; not rendered\n"
            ));
        }
        out.push_str(&children_yaml(children, capabilities.pdb)?);
    }
    Ok(out)
}

fn doc<T: Serialize>(out: &mut String, object: &T) -> Result<(), RenderError> {
    let yaml = serde_yaml::to_string(object)
        .map_err(|e| RenderError::Endpoint { endpoint: String::new(), message: e.to_string() })?;
    out.push_str("---\n");
    out.push_str(&yaml);
    Ok(())
}

fn children_yaml(children: Children, pdb: PdbApi) -> Result<String, RenderError> {
    let Children {
        service_account,
        gateway_config,
        deployment,
        service,
        network_policy,
        disruption_budget,
        service_monitor,
        prometheus_rule,
    } = children;
    let mut out = String::new();
    doc(&mut out, &service_account)?;
    doc(&mut out, &gateway_config)?;
    doc(&mut out, &deployment)?;
    doc(&mut out, &service)?;
    doc(&mut out, &network_policy)?;
    match (disruption_budget, pdb) {
        (Some(p), PdbApi::V1beta1) => doc(&mut out, &PodDisruptionBudgetV1beta1::from(p))?,
        (Some(p), _) => doc(&mut out, &p)?,
        (None, _) => {}
    }
    if let Some(sm) = service_monitor {
        doc(&mut out, &sm)?;
    }
    if let Some(pr) = prometheus_rule {
        doc(&mut out, &pr)?;
    }
    Ok(out)
}
