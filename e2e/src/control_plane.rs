//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager v1.20.2, one temporary directory per run, random
//! free ports, token authentication and RBAC (the envtest idea, plus the
//! controller manager for garbage collection and Deployment → Pod).
//!
//! Processes started for a test belong to a keeper thread that lives as long
//! as the test process: when the process ends in any way (a failed test, a
//! panic, `kill -9`), the kernel sends each child SIGKILL (PR_SET_PDEATHSIG).
//! `stop()` (and `Drop`) stops them earlier, by pid, SIGTERM then SIGKILL.
//! A detached control plane (`control-plane up`) outlives its starter and is
//! stopped by `control-plane down`, by the pids it recorded.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The Kubernetes version built from Debian's source package.
pub const KUBERNETES_VERSION: &str = "v1.20.2";
/// The Debian source package version that holds it.
pub const DEBIAN_SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";

const PIDS_FILE: &str = "pids";
const KUBECONFIG_FILE: &str = "kubeconfig";
/// Kubeconfig of the token user `fhir-operator`, the identity the tests
/// run the operator as (its requests are what the audit log counts).
pub const OPERATOR_KUBECONFIG_FILE: &str = "operator.kubeconfig";
/// The API server's audit log: JSON lines, metadata of every request by
/// `fhir-operator` (and nothing else).
pub const AUDIT_LOG_FILE: &str = "audit.log";
/// User name (and group) of the operator's token.
pub const OPERATOR_USER: &str = "fhir-operator";

const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [fhir-operator]
- level: None
";
const SOURCE_FILE: &str = "source";

/// Where the Kubernetes binaries come from.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    /// Absent in envtest asset directories: then nothing garbage-collects.
    pub kube_controller_manager: Option<PathBuf>,
    pub etcd: PathBuf,
    /// Human-readable origin, printed by the tests.
    pub source: String,
}

/// The cache root: `$FHIR_OPERATOR_CACHE`, else `$XDG_CACHE_HOME/fhir-operator`,
/// else `~/.cache/fhir-operator`. Shared with `e2e/control-plane.sh`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FHIR_OPERATOR_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache"));
    base.join("fhir-operator")
}

fn script() -> PathBuf {
    crate::crate_dir().join("control-plane.sh")
}

impl Binaries {
    /// `KUBEBUILDER_ASSETS` if set, else the cached Debian build, building it
    /// first (about 8 minutes, once) through `e2e/control-plane.sh build`.
    pub fn discover() -> Result<Self> {
        if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
            let dir = PathBuf::from(assets);
            let apiserver = dir.join("kube-apiserver");
            if !apiserver.is_file() {
                bail!("KUBEBUILDER_ASSETS={} holds no kube-apiserver", dir.display());
            }
            let kcm = dir.join("kube-controller-manager");
            return Ok(Self {
                kube_apiserver: apiserver,
                kube_controller_manager: kcm.is_file().then_some(kcm),
                etcd: find_etcd(Some(&dir))?,
                source: format!("KUBEBUILDER_ASSETS={}", dir.display()),
            });
        }
        let bin = cache_root().join(format!("k8s-{KUBERNETES_VERSION}")).join("bin");
        if !bin.join("kube-apiserver").is_file() || !bin.join("kube-controller-manager").is_file() {
            eprintln!("control-plane: no cached Kubernetes binaries in {}; building them", bin.display());
            let status = Command::new("bash")
                .arg(script())
                .arg("build")
                .status()
                .with_context(|| format!("running {} build", script().display()))?;
            if !status.success() {
                bail!("`{} build` failed ({status}); its output above says why", script().display());
            }
        }
        Ok(Self {
            kube_apiserver: bin.join("kube-apiserver"),
            kube_controller_manager: Some(bin.join("kube-controller-manager")),
            etcd: find_etcd(None)?,
            source: format!(
                "built from Debian source package kubernetes={DEBIAN_SOURCE_VERSION}, cached in {}",
                bin.display()
            ),
        })
    }
}

fn find_etcd(dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = dir.map(|d| d.join("etcd")).filter(|p| p.is_file()) {
        return Ok(p);
    }
    which("etcd")
        .ok_or_else(|| anyhow!("etcd not found; install Debian package etcd-server (apt-get install -y etcd-server)"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// How the processes are owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Die with the starting process (tests).
    Owned,
    /// Outlive it, in their own session; stopped with [`stop_recorded`].
    Detached,
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    source: String,
    pids: Vec<(String, u32)>,
    /// How each process was started, to start it again after a fault.
    commands: Vec<(String, PathBuf, Vec<std::ffi::OsString>)>,
    etcd_port: u16,
    api_port: u16,
    keeper: Option<Keeper>,
    remove_dir: bool,
    /// Set for a control plane with a node (`start_with_node`).
    node: Option<crate::node::NodeInfo>,
    /// Held while this process's node runs: one node at a time per machine
    /// (they share the engine, the iptables chains and the sysctls).
    node_lock: Option<fs::File>,
}

impl ControlPlane {
    /// Starts a control plane in a new directory under `parent` (the system
    /// temp dir when `None`) and waits until the API server is ready.
    pub fn start(parent: Option<&Path>, lifetime: Lifetime) -> Result<Self> {
        Self::start_retrying(parent, lifetime, false)
    }

    /// A control plane with a real node (see [`crate::node`]): the API
    /// server on the docker bridge address with Node,RBAC authorization,
    /// the controller manager with node lifecycle, kube-scheduler, a
    /// kubelet (dockershim, pause image built here) and kube-proxy
    /// (iptables). Starts the Docker engine if none runs, builds the node
    /// binaries and images if they are not cached. Returns once the API
    /// server is ready; [`ControlPlane::wait_node_ready`] waits for the node.
    pub fn start_with_node(parent: Option<&Path>, lifetime: Lifetime) -> Result<Self> {
        Self::start_retrying(parent, lifetime, true)
    }

    /// The free ports are chosen before etcd and the API server bind them,
    /// so another process of a parallel test run can take one first: that
    /// start is stopped and made again on new ports (at most three times).
    fn start_retrying(parent: Option<&Path>, lifetime: Lifetime, with_node: bool) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_inner(parent, lifetime, with_node) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("control-plane: a port was taken meanwhile ({e:#}); starting again on new ports");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_inner(parent: Option<&Path>, lifetime: Lifetime, with_node: bool) -> Result<Self> {
        let binaries = Binaries::discover()?;
        let node_binaries = if with_node { Some(crate::node::NodeBinaries::discover()?) } else { None };
        let parent = parent.map(Path::to_owned).unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        reap_stale_dirs(&parent, false);
        let dir = tempfile::Builder::new()
            .prefix("fhir-control-plane-")
            .tempdir_in(&parent)
            .context("creating the control plane directory")?
            .keep();
        let keeper = (lifetime == Lifetime::Owned).then(Keeper::spawn);
        let mut plane = Self {
            kubeconfig: dir.join(KUBECONFIG_FILE),
            dir,
            source: binaries.source.clone(),
            pids: Vec::new(),
            commands: Vec::new(),
            etcd_port: 0,
            api_port: 0,
            keeper,
            remove_dir: lifetime == Lifetime::Owned,
            node: None,
            node_lock: None,
        };
        let booted = match node_binaries {
            Some(node_binaries) => plane.prepare_node(node_binaries).and_then(|()| plane.boot(&binaries)),
            None => plane.boot(&binaries),
        };
        if let Err(e) = booted {
            plane.stop();
            return Err(e);
        }
        Ok(plane)
    }

    fn boot(&mut self, bin: &Binaries) -> Result<()> {
        let d = self.dir.clone();
        fs::create_dir_all(d.join("certs"))?;
        openssl(&["genrsa", "-out", path_str(&d.join("sa.key"))?, "2048"])?;
        openssl(&["rsa", "-in", path_str(&d.join("sa.key"))?, "-pubout", "-out", path_str(&d.join("sa.pub"))?])?;
        let token = random_hex(32)?;
        let operator_token = random_hex(32)?;
        // The operator's user is in group `fhir-operator` only: what it may
        // do is what RBAC bindings for that user or group grant.
        let mut tokens = format!(
            "{token},admin,admin,system:masters\n{operator_token},{OPERATOR_USER},{OPERATOR_USER},{OPERATOR_USER}\n"
        );
        let mut node_tokens = Vec::new();
        if let Some(node) = &self.node {
            // The node's components, each with the identity the bootstrap
            // RBAC rules (and the Node authorizer) expect.
            for (component, user, group) in [
                ("kubelet", format!("system:node:{}", node.name), "system:nodes"),
                ("kube-proxy", "system:kube-proxy".to_owned(), "system:node-proxier"),
                ("kube-scheduler", "system:kube-scheduler".to_owned(), "system:kube-scheduler"),
            ] {
                let t = random_hex(32)?;
                tokens.push_str(&format!("{t},{user},{user},{group}\n"));
                node_tokens.push((component, t));
            }
        }
        fs::write(d.join("tokens.csv"), tokens)?;
        fs::write(d.join("audit-policy.yaml"), AUDIT_POLICY)?;
        fs::write(d.join(SOURCE_FILE), format!("{}\n", self.source))?;

        let [etcd_port, peer_port, api_port] = free_ports()?;
        (self.etcd_port, self.api_port) = (etcd_port, api_port);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Command::new(&bin.etcd);
        etcd.args(["--data-dir", path_str(&d.join("etcd"))?])
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
            .arg("--unsafe-no-fsync");
        self.spawn("etcd", etcd)?;
        self.wait_until("etcd", Duration::from_secs(30), || etcd_healthy(etcd_port))?;

        // With a node, the API server listens on the docker bridge address
        // (pods reach the `kubernetes` Service there; its self-signed
        // certificate names that address, so every kubeconfig uses it).
        let host = self.node.as_ref().map(|n| n.address.to_string()).unwrap_or_else(|| "127.0.0.1".to_owned());
        let mut api = Command::new(&bin.kube_apiserver);
        api.arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--bind-address={host}"))
            .arg(format!("--advertise-address={host}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--token-auth-file={}", d.join("tokens.csv").display()));
        if self.node.is_some() {
            crate::node::kubelet_client_certs(&d)?;
            api.arg("--authorization-mode=Node,RBAC")
                .arg("--kubelet-preferred-address-types=InternalIP,Hostname")
                .arg(format!("--kubelet-client-certificate={}", d.join("pki/apiserver-kubelet-client.crt").display()))
                .arg(format!("--kubelet-client-key={}", d.join("pki/apiserver-kubelet-client.key").display()));
        } else {
            api.arg("--authorization-mode=RBAC");
        }
        api.arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", d.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", d.join("sa.key").display()))
            // Room for thousands of Services (benchmarks create one per endpoint).
            .arg("--service-cluster-ip-range=10.0.0.0/16")
            .arg("--allow-privileged=false")
            .arg(format!("--audit-policy-file={}", d.join("audit-policy.yaml").display()))
            .arg(format!("--audit-log-path={}", d.join(AUDIT_LOG_FILE).display()))
            .arg("--audit-log-format=json")
            .arg("--audit-log-mode=blocking");
        let cert = d.join("certs").join("apiserver.crt");
        fs::write(&self.kubeconfig, kubeconfig(&host, api_port, &cert, &token))?;
        fs::write(d.join(OPERATOR_KUBECONFIG_FILE), kubeconfig(&host, api_port, &cert, &operator_token))?;
        for (component, t) in &node_tokens {
            fs::write(d.join(format!("{component}.kubeconfig")), kubeconfig(&host, api_port, &cert, t))?;
        }
        self.spawn("kube-apiserver", api)?;
        let kubeconfig = self.kubeconfig.clone();
        self.wait_until("kube-apiserver", Duration::from_secs(90), || cert.is_file() && apiserver_ready(&kubeconfig))?;

        if let Some(kcm_bin) = &bin.kube_controller_manager {
            let kc = self.kubeconfig.display().to_string();
            let mut kcm = Command::new(kcm_bin);
            kcm.arg(format!("--kubeconfig={kc}"))
                .arg(format!("--authentication-kubeconfig={kc}"))
                .arg(format!("--authorization-kubeconfig={kc}"))
                .arg(format!("--service-account-private-key-file={}", d.join("sa.key").display()))
                .arg(format!("--root-ca-file={}", cert.display()))
                .arg("--use-service-account-credentials=false")
                // Node lifecycle takes the new node's not-ready taint away.
                .arg(if self.node.is_some() {
                    "--controllers=*,-nodeipam,-ttl,-bootstrapsigner,-tokencleaner"
                } else {
                    "--controllers=*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner"
                })
                .args(["--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--port=0"]);
            self.spawn("kube-controller-manager", kcm)?;
        } else {
            eprintln!(
                "control-plane: WARNING: no kube-controller-manager beside kube-apiserver: \
                 owner references will not garbage-collect and Deployments will not make Pods"
            );
        }
        if let Some(node) = self.node.clone() {
            self.boot_node(&node)?;
        }
        Ok(())
    }

    /// Before the control plane: the Docker engine, the images, the node's
    /// name and address.
    fn prepare_node(&mut self, binaries: crate::node::NodeBinaries) -> Result<()> {
        self.node_lock = Some(crate::node::lock()?);
        let started_docker = crate::node::ensure_docker(&self.dir)?.is_some();
        let images = crate::node::Images::build()?;
        let address = crate::node::docker_bridge_address()?;
        let name = format!("fhir-node-{}", &random_hex(3)?);
        self.node = Some(crate::node::NodeInfo { name, address, images, binaries, started_docker });
        Ok(())
    }

    fn boot_node(&mut self, node: &crate::node::NodeInfo) -> Result<()> {
        let d = self.dir.clone();
        let root = d.join("kubelet");
        crate::node::record_baseline(&d, &root)?;
        let kc = |c: &str| d.join(format!("{c}.kubeconfig")).display().to_string();

        let mut sched = Command::new(&node.binaries.kube_scheduler);
        sched.arg(format!("--kubeconfig={}", kc("kube-scheduler"))).args([
            "--leader-elect=false",
            "--port=0",
            "--secure-port=0",
        ]);
        self.spawn("kube-scheduler", sched)?;

        let [kubelet_port, proxy_healthz, proxy_metrics] = free_ports()?;
        let addr = node.address;
        let mut kubelet = Command::new(&node.binaries.kubelet);
        kubelet
            .arg(format!("--kubeconfig={}", kc("kubelet")))
            .arg(format!("--hostname-override={}", node.name))
            .arg(format!("--node-ip={addr}"))
            .arg(format!("--address={addr}"))
            .arg(format!("--port={kubelet_port}"))
            .args(["--healthz-port=0", "--read-only-port=0"])
            // Only the API server (its client certificate) may use the
            // kubelet's API; tokens are checked with the API server.
            .args(["--anonymous-auth=false", "--authentication-token-webhook", "--authorization-mode=Webhook"])
            .arg(format!("--client-ca-file={}", d.join("pki/ca.crt").display()))
            .args(["--container-runtime=docker", "--docker-endpoint=unix:///var/run/docker.sock"])
            .arg(format!("--container-runtime-endpoint=unix://{}", d.join("dockershim.sock").display()))
            .arg(format!("--experimental-dockershim-root-directory={}", d.join("dockershim").display()))
            .arg(format!("--root-dir={}", root.display()))
            .arg(format!("--cert-dir={}", d.join("kubelet-pki").display()))
            .arg(format!("--volume-plugin-dir={}", d.join("volume-plugins").display()))
            .arg(format!("--pod-infra-container-image={}", node.images.pause))
            .args(["--cgroup-driver=cgroupfs", "--cgroups-per-qos=false", "--enforce-node-allocatable="])
            .arg("--fail-swap-on=false")
            // A shared engine: delete no image and evict nothing for disk
            // or memory that is not this node's doing.
            .args(["--image-gc-high-threshold=100", "--image-gc-low-threshold=99"])
            .arg("--eviction-hard=memory.available<1Mi,nodefs.available<1%,imagefs.available<1%")
            .arg("--hairpin-mode=hairpin-veth")
            .arg("--cluster-domain=cluster.local")
            .arg("--node-status-update-frequency=2s");
        self.spawn("kubelet", kubelet)?;

        let mut proxy = Command::new(&node.binaries.kube_proxy);
        proxy
            .arg(format!("--kubeconfig={}", kc("kube-proxy")))
            .arg(format!("--hostname-override={}", node.name))
            .arg("--proxy-mode=iptables")
            .arg(format!("--healthz-bind-address=127.0.0.1:{proxy_healthz}"))
            .arg(format!("--metrics-bind-address=127.0.0.1:{proxy_metrics}"))
            // Leave the host's conntrack sysctls alone.
            .args(["--conntrack-max-per-core=0", "--conntrack-min=0"])
            .args(["--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0"])
            .arg("--oom-score-adj=0");
        self.spawn("kube-proxy", proxy)?;
        Ok(())
    }

    /// The node of a control plane started with [`ControlPlane::start_with_node`].
    pub fn node(&self) -> Option<&crate::node::NodeInfo> {
        self.node.as_ref()
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<()> {
        let program = cmd.get_program().into();
        let args = cmd.get_args().map(Into::into).collect();
        self.commands.retain(|(n, _, _)| n != name);
        self.commands.push((name.to_owned(), program, args));
        self.pids.retain(|(n, _)| n != name);
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let pid = match &self.keeper {
            Some(keeper) => keeper.spawn_child(name, cmd)?,
            None => {
                // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::setsid();
                        Ok(())
                    });
                }
                cmd.spawn().with_context(|| format!("starting {name}"))?.id()
            }
        };
        self.pids.push((name.to_owned(), pid));
        let record: String = self.pids.iter().map(|(n, p)| format!("{n} {p}\n")).collect();
        fs::write(self.dir.join(PIDS_FILE), record)?;
        Ok(())
    }

    fn wait_until(&self, name: &str, timeout: Duration, ready: impl Fn() -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            if let Some((_, pid)) = self.pids.iter().find(|(n, _)| n == name)
                && !alive(*pid, name)
            {
                bail!("{name} exited during start-up; last lines of its log:\n{}", self.log_tail(name));
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("{name} was not ready within {timeout:?}; last lines of its log:\n{}", self.log_tail(name))
    }

    /// The last lines of a component's log, for error messages.
    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// `kill -9` of one component (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`), as a crash would; waits until it is gone.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let pid = self.pid_of(name)?;
        signal(pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid, name) {
            if Instant::now() > deadline {
                bail!("{name} (pid {pid}) still runs 10 s after SIGKILL");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts a component again with the flags it had, and waits until it
    /// serves (etcd: `/health`; the API server: `/readyz`).
    pub fn start_again(&mut self, name: &str) -> Result<()> {
        let (_, program, args) = self
            .commands
            .iter()
            .find(|(n, _, _)| n == name)
            .cloned()
            .with_context(|| format!("no {name} was started"))?;
        if self.pid_of(name).is_ok_and(|pid| alive(pid, name)) {
            bail!("{name} still runs");
        }
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.spawn(name, cmd)?;
        let kubeconfig = self.kubeconfig.clone();
        let etcd_port = self.etcd_port;
        match name {
            "etcd" => self.wait_until(name, Duration::from_secs(30), || etcd_healthy(etcd_port)),
            "kube-apiserver" => self.wait_until(name, Duration::from_secs(90), || apiserver_ready(&kubeconfig)),
            _ => Ok(()),
        }
    }

    fn pid_of(&self, name: &str) -> Result<u32> {
        self.pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p).with_context(|| format!("no {name} was started"))
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.join(OPERATOR_KUBECONFIG_FILE)
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.join(AUDIT_LOG_FILE)
    }

    /// Where the binaries came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Process names and pids, in start order.
    pub fn pids(&self) -> &[(String, u32)] {
        &self.pids
    }

    /// Stops every process this control plane started, by pid, last first;
    /// an owned control plane's directory is removed too.
    pub fn stop(&mut self) {
        match self.keeper.take() {
            Some(keeper) => keeper.stop(),
            None => terminate(&self.pids),
        }
        self.pids.clear();
        match crate::node::cleanup(&self.dir) {
            Ok(done) if !done.is_empty() => eprintln!("control-plane: node cleanup: {}", done.join("; ")),
            Ok(_) => {}
            Err(e) => eprintln!("control-plane: node cleanup failed: {e:#}"),
        }
        self.node_lock = None;
        if self.remove_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

static AT_EXIT: std::sync::Mutex<Vec<ControlPlane>> = std::sync::Mutex::new(Vec::new());

extern "C" fn stop_at_exit_handler() {
    let planes = AT_EXIT.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
    for mut plane in planes {
        plane.stop();
    }
}

impl ControlPlane {
    /// Keeps the control plane until the process exits normally, then stops
    /// it and removes its directory (for one shared per test process). If
    /// the process is killed instead, the kernel still kills the children.
    pub fn stop_at_exit(self) {
        static REGISTER: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain extern "C" fn with no captured state.
        REGISTER.call_once(|| unsafe {
            libc::atexit(stop_at_exit_handler);
        });
        if let Ok(mut planes) = AT_EXIT.lock() {
            planes.push(self);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.keeper.is_some() {
            self.stop();
        }
    }
}

/// Stops the processes a detached control plane recorded in `dir`.
/// Returns the names of the processes it stopped.
pub fn stop_recorded(dir: &Path) -> Result<Vec<String>> {
    let pids = read_pids(dir)?;
    terminate(&pids);
    let mut stopped: Vec<String> = pids.into_iter().map(|(n, _)| n).collect();
    stopped.extend(crate::node::cleanup(dir)?);
    Ok(stopped)
}

/// The processes recorded in `dir` and whether each one still runs.
pub fn recorded_status(dir: &Path) -> Result<Vec<(String, u32, bool)>> {
    Ok(read_pids(dir)?.into_iter().map(|(n, p)| (n.clone(), p, alive(p, &n))).collect())
}

fn read_pids(dir: &Path) -> Result<Vec<(String, u32)>> {
    let path = dir.join(PIDS_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("no control plane recorded in {}", dir.display()))?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, p)| {
            Ok((n.to_owned(), p.trim().parse().with_context(|| format!("bad pid line in {}", path.display()))?))
        })
        .collect()
}

/// Removes control plane directories under `parent` whose processes are all
/// gone (left by test processes that were killed). A dead node's leftovers
/// are undone only while no other node runs: with `wait_for_node`, this
/// waits for the node lock (`down` of a directory the user named);
/// otherwise such a directory is left for a later call.
pub fn reap_stale_dirs(parent: &Path, wait_for_node: bool) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_plane = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("fhir-control-plane-"));
        if is_plane
            && let Ok(pids) = read_pids(&path)
            && pids.iter().all(|(n, p)| !alive(*p, n))
        {
            // A killed owner's node left containers, chains, mounts: undo
            // them, but only while no other node runs (its chains are not
            // in the dead one's baseline); otherwise leave the directory.
            let _lock = if path.join(crate::node::STATE_FILE).exists() {
                let lock = if wait_for_node { crate::node::lock().ok() } else { crate::node::try_lock() };
                match lock {
                    Some(lock) => Some(lock),
                    None => continue,
                }
            } else {
                None
            };
            match crate::node::cleanup(&path) {
                Ok(done) if !done.is_empty() => {
                    eprintln!("control-plane: cleaned up after {}: {}", path.display(), done.join("; "))
                }
                Ok(_) => {}
                Err(e) => eprintln!("control-plane: cleaning up after {} failed: {e:#}", path.display()),
            }
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// SIGTERM, up to 10 s for a clean exit, then SIGKILL; last started first.
/// A pid is signalled only while its command line still names the process,
/// so a recycled pid is never hit.
fn terminate(pids: &[(String, u32)]) {
    terminate_pids(pids, Duration::from_secs(10))
}

/// [`terminate`] with its own grace period.
pub fn terminate_pids(pids: &[(String, u32)], grace: Duration) {
    for (name, pid) in pids.iter().rev() {
        if !alive(*pid, name) {
            continue;
        }
        signal(*pid, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while alive(*pid, name) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if alive(*pid, name) {
            signal(*pid, libc::SIGKILL);
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we started and re-checked just before.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Whether `pid` runs (not a zombie) and its command line names `name`.
pub fn pid_alive(pid: u32, name: &str) -> bool {
    alive(pid, name)
}

fn alive(pid: u32, name: &str) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(name)
}

/// Owns the child processes of an owned control plane. It is a thread of its
/// own because PR_SET_PDEATHSIG fires when the thread that forked the child
/// ends: this thread ends only with the process, or when asked to stop.
struct Keeper {
    tx: mpsc::Sender<KeeperRequest>,
    thread: Option<thread::JoinHandle<()>>,
}

enum KeeperRequest {
    Spawn(String, Box<Command>, mpsc::Sender<Result<u32>>),
    Stop,
}

impl Keeper {
    fn spawn() -> Self {
        let (tx, rx) = mpsc::channel::<KeeperRequest>();
        let thread = thread::Builder::new()
            .name("control-plane-keeper".into())
            .spawn(move || {
                let mut children: Vec<(String, Child)> = Vec::new();
                // A dropped sender (the ControlPlane leaked in a static) keeps
                // the children for the life of the process.
                while let Ok(request) = rx.recv() {
                    match request {
                        KeeperRequest::Spawn(name, mut cmd, reply) => {
                            // SAFETY: prctl is async-signal-safe.
                            unsafe {
                                cmd.pre_exec(|| {
                                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                                    Ok(())
                                });
                            }
                            let result = cmd.spawn().with_context(|| format!("starting {name}"));
                            let _ = reply.send(result.map(|child| {
                                let pid = child.id();
                                children.push((name, child));
                                pid
                            }));
                        }
                        KeeperRequest::Stop => break,
                    }
                }
                let pids: Vec<(String, u32)> = children.iter().map(|(n, c)| (n.clone(), c.id())).collect();
                terminate(&pids);
                for (_, mut child) in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            })
            .expect("spawning the control-plane keeper thread");
        Self { tx, thread: Some(thread) }
    }

    fn spawn_child(&self, name: &str, cmd: Command) -> Result<u32> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .send(KeeperRequest::Spawn(name.to_owned(), Box::new(cmd), reply_tx))
            .map_err(|_| anyhow!("control-plane keeper thread is gone"))?;
        reply_rx.recv().map_err(|_| anyhow!("control-plane keeper thread is gone"))?
    }

    fn stop(mut self) {
        let _ = self.tx.send(KeeperRequest::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts `cmd` from a keeper thread that lives as long as the test
/// process, with PR_SET_PDEATHSIG: the process dies with the test process
/// however it ends (a failed test, a panic, nextest's timeout, `kill -9`),
/// even when it was started from a short-lived thread. For the servers the
/// tests start (PostgreSQL, the S3 server); stop it earlier with
/// [`stop_owned`]. Returns its pid.
pub fn spawn_owned(name: &str, cmd: Command) -> Result<u32> {
    static KEEPER: std::sync::OnceLock<std::sync::Mutex<Keeper>> = std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| std::sync::Mutex::new(Keeper::spawn()));
    let keeper = keeper.lock().map_err(|_| anyhow!("the process keeper is poisoned"))?;
    keeper.spawn_child(name, cmd)
}

/// SIGTERM, up to 10 s for a clean exit, then SIGKILL, for a process that
/// [`spawn_owned`] started (whose command line names `name`).
pub fn stop_owned(name: &str, pid: u32) {
    terminate(&[(name.to_owned(), pid)]);
}

/// Whether that process still runs.
pub fn owned_alive(name: &str, pid: u32) -> bool {
    alive(pid, name)
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| anyhow!("openssl not runnable ({e}); install Debian package openssl"))?;
    if !out.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn free_ports() -> Result<[u16; 3]> {
    // Hold all three listeners at once so the ports differ.
    let listeners =
        [TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?, TcpListener::bind("127.0.0.1:0")?];
    Ok([listeners[0].local_addr()?.port(), listeners[1].local_addr()?.port(), listeners[2].local_addr()?.port()])
}

/// etcd's `/health` over plain HTTP.
fn etcd_healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// The API server's `/readyz`, through the same kubeconfig (and so the same
/// TLS verification and token) that the tests use. Runs on a thread of its
/// own so that it works whether or not the caller is inside a Tokio runtime.
fn apiserver_ready(kubeconfig: &Path) -> bool {
    let kubeconfig = kubeconfig.to_owned();
    thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
        rt.block_on(async {
            let Ok(client) = crate::client_for(&kubeconfig).await else { return false };
            let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else { return false };
            matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
        })
    })
    .join()
    .unwrap_or(false)
}

fn kubeconfig(host: &str, port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fhir-operator-local
  cluster:
    server: https://{host}:{port}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: fhir-operator-local
  context:
    cluster: fhir-operator-local
    user: admin
current-context: fhir-operator-local
",
        ca = ca.display()
    )
}

/// The kubeconfig and binary source a detached control plane recorded.
pub fn recorded(dir: &Path) -> Result<(PathBuf, String)> {
    let kubeconfig = dir.join(KUBECONFIG_FILE);
    if !kubeconfig.is_file() {
        bail!("no control plane recorded in {} (run `e2e/control-plane.sh up`)", dir.display());
    }
    let source = fs::read_to_string(dir.join(SOURCE_FILE)).unwrap_or_default().trim().to_owned();
    Ok((kubeconfig, source))
}

/// A process a test started with [`spawn_owned`], its output in a log file,
/// stopped when dropped (even when an assertion fails).
pub struct OwnedProcess {
    name: &'static str,
    pid: u32,
    log: PathBuf,
}

impl OwnedProcess {
    /// Starts `command` (named `name` on its command line), stdout and
    /// stderr to `log`. Panics, naming it, when it cannot start: a test helper.
    pub fn start(name: &'static str, mut command: Command, log: PathBuf) -> OwnedProcess {
        let file = fs::File::create(&log).expect("log file");
        command.stdin(Stdio::null()).stdout(file.try_clone().expect("log")).stderr(file);
        let pid = spawn_owned(name, command).unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
        OwnedProcess { name, pid, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to 60 s until something accepts connections on `port` of
    /// loopback; panics with this process's log otherwise.
    pub fn await_port(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not listen on {port}:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OwnedProcess {
    fn drop(&mut self) {
        stop_owned(self.name, self.pid);
    }
}
