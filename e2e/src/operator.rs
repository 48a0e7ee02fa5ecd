//! The real `fhir-operator` binary, run as the `fhir-operator` token user
//! against the test cluster, with its RBAC from `fhir_operator::rbac`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::control_plane::OPERATOR_USER;

/// Path of the operator binary built beside the test binaries
/// (`make test` and `cargo nextest run --workspace` build it), or
/// `FHIR_OPERATOR_BINARY` when set (a copy that a build of another checkout
/// sharing the target directory cannot replace mid-run).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FHIR_OPERATOR_BINARY").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = exe.parent().map(Path::to_owned).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join("fhir-operator")
}

/// Grants the `fhir-operator` user exactly the operator's RBAC rules.
pub async fn grant_rbac(client: &Client) -> Result<()> {
    let params = PatchParams::apply("fhir-operator-e2e").force();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles.patch("fhir-operator", &params, &Patch::Apply(fhir_operator::rbac::cluster_role("fhir-operator"))).await?;
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some("fhir-operator".into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: "fhir-operator".into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: OPERATOR_USER.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings.patch("fhir-operator", &params, &Patch::Apply(binding)).await?;
    Ok(())
}

/// A running operator process; killed when dropped.
pub struct Operator {
    child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts `fhir-operator run` with `kubeconfig` and extra arguments,
    /// and waits until `/readyz` says ready. Leader election is off unless
    /// `extra` sets `--leader-elect`: a test that kills and restarts the
    /// operator would otherwise wait out the dead process's lease each time.
    pub fn start(kubeconfig: &Path, extra: &[&str]) -> Result<Self> {
        let bin = binary();
        if !bin.is_file() {
            bail!("{} not found: build it first (`cargo build -p fhir-operator`; `make test` does)", bin.display());
        }
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("operator.log");
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let out = std::fs::File::create(&log)?;
        // FHIR_E2E_OPERATOR_WRAPPER runs the operator under another program,
        // e.g. `heaptrack` for a heap profile of a benchmark run. Only the
        // wrapper is stopped at the end: a wrapper that forks (heaptrack
        // does) leaves the operator running, so stop it by hand. For
        // profiling only, never in the tests.
        let wrapper = std::env::var("FHIR_E2E_OPERATOR_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run").arg(format!("--metrics-addr=127.0.0.1:{port}"));
        if !extra.iter().any(|a| a.starts_with("--leader-elect")) {
            cmd.arg("--leader-elect=false");
        }
        cmd.args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("FHIR_E2E_OPERATOR_LOG").unwrap_or_else(|_| "info,fhir_operator=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe. The operator dies with the
        // thread that started it (the test's), however the test ends.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let mut op = Self { child, metrics_port: port, log, _dir: dir };
        op.wait_ready(Duration::from_secs(60))?;
        Ok(op)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the operator exited ({status}) before it was ready; its log:\n{}", self.logs());
            }
            if self.get("/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the operator was not ready within {timeout:?}; its log:\n{}", self.logs())
    }

    /// GET on the metrics port: (status code, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// The sum of a metric's samples (all label sets), 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!("the operator did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    /// Stops the process; a failing test also shows what it said last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!(
                "--- last operator log lines (pid {}) ---\n{}",
                self.pid(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.kill9();
    }
}
