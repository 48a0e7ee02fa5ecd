//! Test support for fhir-operator: the example catalogue and a real
//! Kubernetes API server to test against.
//!
//! [`cluster()`] picks, in order:
//! 1. `USE_EXISTING_CLUSTER=true`: the cluster of `KUBECONFIG` (kind, k3d, a
//!    real cluster, or the one `make test` starts with `control-plane up`);
//! 2. otherwise a control plane of this process (see [`control_plane`]),
//!    from `KUBEBUILDER_ASSETS` or the cached Debian build.

pub mod control_plane;
pub mod examples;
pub mod fault_proxy;
pub mod fhir_client;
pub mod helm;
pub mod hfs;
pub mod idp;
pub mod node;
pub mod operator;
pub mod postgres;
pub mod s3;
pub mod venv;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

use control_plane::{ControlPlane, Lifetime};

/// This crate's directory (`e2e/`). At run time cargo says where it is
/// (`CARGO_MANIFEST_DIR` is set for tests and `cargo run`); the compile-time
/// value is only the fallback, because one target directory is shared by
/// several checkouts (CI's clones, worktrees) and this library is not
/// rebuilt when only the checkout's path differs.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("Cargo.toml").is_file() && dir.join("control-plane.sh").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Runs one of this crate's install scripts (`venv.sh`, `s3s.sh`,
/// `hfs.sh`: idempotent, locked, quiet when all is there) and returns the
/// path it prints; on failure the error says `what_is_needed`.
pub fn installed_path(script: &str, what_is_needed: &str) -> Result<PathBuf> {
    let script = crate_dir().join(script);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): {what_is_needed}", script.display(), out.status);
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.exists() {
        bail!("{} printed {}, which does not exist", script.display(), path.display());
    }
    Ok(path)
}

/// The API server the tests talk to.
pub struct TestCluster {
    kubeconfig: PathBuf,
    description: String,
    /// The `fhir-operator` user's kubeconfig (own control planes only;
    /// an existing cluster runs the operator with KUBECONFIG's identity).
    operator_kubeconfig: PathBuf,
    audit_log: Option<PathBuf>,
}

impl TestCluster {
    /// A new client (clients are bound to the test's own Tokio runtime).
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("no client for {}: {e:#}", self.kubeconfig.display()))
    }

    /// Which cluster this is and where its binaries came from.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn operator_kubeconfig(&self) -> &Path {
        &self.operator_kubeconfig
    }

    /// The API server's audit log of the operator's requests, where the
    /// harness started the API server (and so configured auditing).
    pub fn audit_log(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }
}

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The cluster for this test process, started on first use. Panics with the
/// reason when none can be had: an e2e test never passes without a server.
pub fn cluster() -> &'static TestCluster {
    let result = CLUSTER.get_or_init(|| pick_cluster().map_err(|e| format!("{e:#}")));
    match result {
        Ok(cluster) => cluster,
        Err(e) => panic!("no Kubernetes API server for the e2e tests: {e}"),
    }
}

fn pick_cluster() -> Result<TestCluster> {
    if std::env::var("USE_EXISTING_CLUSTER").is_ok_and(|v| v == "true") {
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .context("USE_EXISTING_CLUSTER=true needs KUBECONFIG to name the cluster's kubeconfig file")?;
        if !kubeconfig.is_file() {
            bail!("KUBECONFIG={} is not a file", kubeconfig.display());
        }
        let source = std::env::var("FHIR_E2E_SOURCE").unwrap_or_else(|_| "existing cluster".to_owned());
        let description = format!("{source} (KUBECONFIG={})", kubeconfig.display());
        eprintln!("e2e: using {description}");
        return Ok(TestCluster { operator_kubeconfig: kubeconfig.clone(), kubeconfig, description, audit_log: None });
    }
    let plane = ControlPlane::start(None, Lifetime::Owned)?;
    let description = format!("control plane of this test process, {}", plane.source());
    eprintln!("e2e: started {description}");
    let cluster = TestCluster {
        kubeconfig: plane.kubeconfig().to_owned(),
        description,
        operator_kubeconfig: plane.operator_kubeconfig(),
        audit_log: Some(plane.audit_log()),
    };
    plane.stop_at_exit();
    Ok(cluster)
}

/// A client from a kubeconfig file (its current context).
pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    fhir_operator::install_tls_provider();
    let kc = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Installs (creates, or replaces when present) every CRD of the operator
/// and waits until each is established. Create/replace, not server-side
/// apply: v1.20 refuses to apply a CRD carrying `x-kubernetes-validations`
/// and, on create, drops them.
pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in fhir_operator::api::crds() {
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        for attempt in 0.. {
            let result = match api.get_opt(&name).await? {
                Some(existing) => {
                    let mut desired = crd.clone();
                    desired.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &desired).await.map(|_| ())
                }
                None => api.create(&PostParams::default(), &crd).await.map(|_| ()),
            };
            match result {
                Ok(()) => break,
                // Another test process installed or updated it meanwhile.
                Err(kube::Error::Api(s)) if (s.code == 409) && attempt < 5 => continue,
                Err(e) => return Err(e).with_context(|| format!("installing CRD {name}")),
            }
        }
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not established within 30s"))??;
    }
    Ok(())
}

/// Creates a fresh namespace `e2e-<prefix>-<random>` for one test.
pub async fn namespace(client: &Client, prefix: &str) -> Result<String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            generate_name: Some(format!("e2e-{prefix}-")),
            labels: Some([("fhiroperator.io/e2e".to_owned(), "true".to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = api.create(&PostParams::default(), &ns).await.context("creating a test namespace")?;
    created.metadata.name.context("namespace without a name")
}

/// The endpoint `name` with its `auditLog` compliance entry, when that
/// entry's reason is `reason`.
pub async fn audit_log_entry(
    endpoints: &Api<fhir_operator::api::FhirEndpoint>,
    name: &str,
    reason: &str,
) -> Result<Option<(fhir_operator::api::FhirEndpoint, fhir_operator::api::ComplianceEntry)>> {
    let ep = endpoints.get(name).await?;
    let entry = ep
        .status
        .as_ref()
        .and_then(|s| s.compliance.iter().find(|c| c.name == fhir_operator::api::ComplianceCheck::AuditLog).cloned())
        .filter(|c| c.reason == reason);
    Ok(entry.map(|e| (ep, e)))
}

/// Polls `check` every 100 ms until it yields a value or `timeout` passes;
/// the error names what was awaited and the last thing seen.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("nothing yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Server-side applies `value` (any kind; RateLimitTiers are cluster-scoped,
/// everything else goes into `namespace`) as the test's own field manager.
/// Panics when the API server refuses it: a test helper.
pub async fn apply_value(client: &Client, namespace: &str, value: &serde_json::Value) {
    use kube::ResourceExt;
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let obj: DynamicObject = serde_json::from_value(value.clone()).expect("object");
    let types = obj.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("gvk");
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = if types.kind == "RateLimitTier" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), namespace, &ar)
    };
    api.patch(&obj.name_any(), &PatchParams::apply("e2e").force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("applying {} {}: {e}", types.kind, obj.name_any()));
}

/// Marks the pods matching `selector` Running and Ready (there is no
/// kubelet), so that ReplicaSets and Deployments count them as available
/// through the real controllers. Returns how many pods it marked.
pub async fn mark_pods_ready(client: &Client, namespace: &str, selector: &str) -> Result<usize> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, Patch, PatchParams};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut marked = 0;
    for pod in list.items {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        marked += 1;
    }
    Ok(marked)
}

/// The stand-in kubelet: marks the endpoint pods of `namespace` ready
/// every 200 ms (see [`mark_pods_ready`]) until `stop` is set, so that
/// Deployments roll out through the real controllers.
pub fn stand_in_kubelet(
    client: Client,
    namespace: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = mark_pods_ready(&client, &namespace, "app.kubernetes.io/name=fhir-endpoint").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Write requests (create, update, patch, delete) the operator made, from
/// the audit log, as `verb resource namespace/name` lines.
pub fn operator_writes(audit_log: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(audit_log).with_context(|| format!("reading {}", audit_log.display()))?;
    let mut writes = Vec::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let verb = event["verb"].as_str().unwrap_or_default();
        if event["user"]["username"] != control_plane::OPERATOR_USER
            || !matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
        {
            continue;
        }
        let o = &event["objectRef"];
        writes.push(format!(
            "{verb} {}{} {}/{}",
            o["resource"].as_str().unwrap_or_default(),
            o["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default(),
            o["namespace"].as_str().unwrap_or_default(),
            o["name"].as_str().unwrap_or_default()
        ));
    }
    Ok(writes)
}

/// Every request the operator made, from the audit log.
pub fn operator_requests(audit_log: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(audit_log).with_context(|| format!("reading {}", audit_log.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["user"]["username"] == control_plane::OPERATOR_USER)
        .count())
}
