//! A real node for the control plane: kubelet v1.20.2 with its built-in
//! dockershim on the machine's Docker engine, kube-proxy (iptables) and
//! kube-scheduler, so that pods really run (see `ControlPlane::start_with_node`).
//!
//! Everything the node changes on the host is written down in the control
//! plane directory (`node-state`) *before* it is changed, so that
//! [`cleanup`] undoes it whether the node stopped cleanly or its owner was
//! killed: the containers of the kubelet's pods (found by the pod UIDs under
//! its root directory), the `KUBE-*` iptables chains that were not there
//! before, mounts under the kubelet root, the sysctls the kubelet and
//! kube-proxy set, the host directories the kubelet creates whatever its
//! flags say, and a Docker engine the harness started.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::control_plane::{KUBERNETES_VERSION, cache_root};

/// The state file in the control plane directory.
pub const STATE_FILE: &str = "node-state";

/// Sysctls the kubelet (`vm.overcommit_memory`, `kernel.panic*`, keys) and
/// kube-proxy (`route_localnet`) may set: their values before, restored after.
const SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.conf.all.route_localnet",
];

/// Host paths the kubelet creates whatever `--root-dir` says.
const HOST_DIRS: &[&str] = &["/var/log/pods", "/var/log/containers", "/var/lib/kubelet"];

const TABLES: &[&str] = &["filter", "nat", "mangle"];

/// The node's binaries (`e2e/control-plane.sh build-node`).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
}

impl NodeBinaries {
    /// The cached build, building it first (about 20 minutes, once).
    pub fn discover() -> Result<Self> {
        let dir = cache_root().join(format!("k8s-{KUBERNETES_VERSION}")).join("node-bin");
        let script = crate::crate_dir().join("control-plane.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg("build-node")
            .status()
            .with_context(|| format!("running {} build-node", script.display()))?;
        if !status.success() {
            bail!("`{} build-node` failed ({status}); its output above says why", script.display());
        }
        Ok(Self {
            kubelet: dir.join("kubelet"),
            kube_proxy: dir.join("kube-proxy"),
            kube_scheduler: dir.join("kube-scheduler"),
        })
    }
}

/// The images of `e2e/images.sh`, built locally.
#[derive(Debug, Clone)]
pub struct Images {
    pub pause: String,
    pub nginx: String,
    /// PostgreSQL 15: database pods and the backup/drill Jobs.
    pub postgres: String,
    /// The Helios FHIR Server (`spec.server.flavor: helios`).
    pub hfs: String,
    /// The operator binary of this build (gateway-metrics sidecar, backup
    /// agent); rebuilt whenever the binary changes.
    pub operator: String,
}

impl Images {
    /// Builds what is missing (the Docker engine must answer) and returns the references.
    pub fn build() -> Result<Self> {
        let script = crate::crate_dir().join("images.sh");
        let operator = crate::operator::binary();
        if !operator.is_file() {
            bail!(
                "{} not found: build it first (`cargo build -p fhir-operator`; `make test` does)",
                operator.display()
            );
        }
        let out = Command::new("bash")
            .arg(&script)
            .arg("build")
            .arg("--operator")
            .arg(&operator)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!("`{}` failed ({}); its output above says why", script.display(), out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{} printed no `{key}=` line", script.display()))
        };
        Ok(Self {
            pause: get("pause")?,
            nginx: get("nginx")?,
            postgres: get("postgres")?,
            hfs: get("hfs")?,
            operator: get("operator")?,
        })
    }

    /// The operator's flags that point its children at these images.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            format!("--gateway-image={}", self.nginx),
            format!("--sidecar-image={}", self.operator),
            format!("--postgres-image={}", self.postgres),
        ]
    }
}

/// What a node of a control plane is.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The Node object's name.
    pub name: String,
    /// The docker bridge address: the API server and the kubelet listen on
    /// it, pods reach the `kubernetes` Service through it.
    pub address: Ipv4Addr,
    pub images: Images,
    pub binaries: NodeBinaries,
    /// Whether the harness started the Docker engine (then with hairpin
    /// mode on the bridge ports: a pod reaches itself through its Service).
    pub started_docker: bool,
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `dockerd` (in its own session, so that it outlives a killed test
/// and its containers can still be removed) unless an engine answers;
/// records its pid in the state file first thing. Returns its pid when it
/// was started here.
pub fn ensure_docker(dir: &Path) -> Result<Option<u32>> {
    if docker_answers() {
        return Ok(None);
    }
    let dockerd = which("dockerd").ok_or_else(|| {
        anyhow!("no Docker engine answers and dockerd is not installed; as root: apt-get install -y docker.io")
    })?;
    let log = fs::File::create(dir.join("dockerd.log"))?;
    let mut cmd = Command::new(dockerd);
    // Without the userland proxy the bridge driver sets hairpin mode on each
    // container's port: a pod's packets to its own Service come back to it
    // (the kubelet's --hairpin-mode works only with kubenet or CNI).
    cmd.arg("--userland-proxy=false");
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting dockerd")?;
    let pid = child.id();
    // Not waited for: it runs in its own session; `cleanup` stops it by pid.
    std::mem::forget(child);
    record(dir, &format!("dockerd {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker_answers() {
        if !crate::control_plane::pid_alive(pid, "dockerd") {
            bail!("dockerd exited; its log: {}", dir.join("dockerd.log").display());
        }
        if Instant::now() > deadline {
            bail!("dockerd did not answer within 60 s; its log: {}", dir.join("dockerd.log").display());
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(Some(pid))
}

/// The IPv4 address of the docker bridge (docker0).
pub fn docker_bridge_address() -> Result<Ipv4Addr> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "docker0"]).output().context("running ip")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("docker0 has no IPv4 address (`ip -4 addr show docker0`: {text:?})"))
}

/// Appends one line to the state file, synced: it must be on disk before
/// the change it describes is made.
pub fn record(dir: &Path, line: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().create(true).append(true).open(dir.join(STATE_FILE))?;
    writeln!(f, "{line}")?;
    f.sync_all()?;
    Ok(())
}

/// Records what the node will change, before it runs: the kubelet root,
/// the sysctls' values, which host directories exist, the iptables chains.
pub fn record_baseline(dir: &Path, kubelet_root: &Path) -> Result<()> {
    let mut lines = vec![format!("kubelet-root {}", kubelet_root.display())];
    for key in SYSCTLS {
        if let Ok(v) = fs::read_to_string(sysctl_path(key)) {
            lines.push(format!("sysctl {key} {}", v.trim()));
        }
    }
    for d in HOST_DIRS {
        if !Path::new(d).exists() {
            lines.push(format!("created-dir {d}"));
        }
    }
    for (cmd, table, chain) in kube_chains() {
        lines.push(format!("chain-before {cmd} {table} {chain}"));
    }
    lines.push("baseline-complete".to_owned());
    record(dir, &lines.join("\n"))
}

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// The `KUBE-*` chains of each table, for iptables and ip6tables.
pub fn kube_chains() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for cmd in ["iptables", "ip6tables"] {
        for table in TABLES {
            let Ok(o) = Command::new(format!("{cmd}-save")).args(["-t", table]).output() else { continue };
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some(chain) = line.strip_prefix(':').and_then(|l| l.split_whitespace().next())
                    && chain.starts_with("KUBE-")
                {
                    out.push((cmd.to_owned(), (*table).to_owned(), chain.to_owned()));
                }
            }
        }
    }
    out
}

/// Containers of the kubelet's pods: those labelled with a pod UID that has
/// a directory under the kubelet root (the kubelet makes it before it asks
/// for the pod's sandbox).
pub fn node_containers(kubelet_root: &Path) -> Vec<String> {
    let uids: BTreeSet<String> = fs::read_dir(kubelet_root.join("pods"))
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    if uids.is_empty() {
        return Vec::new();
    }
    let Ok(out) = Command::new("docker")
        .args(["ps", "-a", "--filter", "label=io.kubernetes.pod.uid"])
        .args(["--format", "{{.ID}} {{.Label \"io.kubernetes.pod.uid\"}}"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, uid)| uids.contains(uid.trim()))
        .map(|(id, _)| id.to_owned())
        .collect()
}

/// Undoes what the node recorded in `dir` (its processes must be stopped
/// first). Idempotent; removes the state file when done. Returns what it did.
pub fn cleanup(dir: &Path) -> Result<Vec<String>> {
    let Ok(text) = fs::read_to_string(dir.join(STATE_FILE)) else { return Ok(Vec::new()) };
    let mut done = Vec::new();
    let mut dockerd = None;
    let mut root = None;
    let mut sysctls = Vec::new();
    let mut created = Vec::new();
    let mut before = BTreeSet::new();
    let mut baseline_complete = false;
    for line in text.lines() {
        let mut w = line.splitn(2, ' ');
        let (key, rest) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        match key {
            "dockerd" => dockerd = rest.trim().parse::<u32>().ok(),
            "kubelet-root" => root = Some(PathBuf::from(rest)),
            "sysctl" => sysctls.extend(rest.split_once(' ').map(|(k, v)| (k.to_owned(), v.to_owned()))),
            "created-dir" => created.push(PathBuf::from(rest)),
            "chain-before" => {
                before.insert(rest.to_owned());
            }
            "baseline-complete" => baseline_complete = true,
            _ => {}
        }
    }
    if let Some(root) = &root {
        let ids = node_containers(root);
        if !ids.is_empty() {
            let status = Command::new("docker").args(["rm", "-f", "-v"]).args(&ids).stdout(Stdio::null()).status();
            done.push(format!("removed {} containers ({status:?})", ids.len()));
        }
        let n = unmount_under(root);
        if n > 0 {
            done.push(format!("unmounted {n} mounts under {}", root.display()));
        }
        let _ = fs::remove_dir_all(root);
    }
    if baseline_complete {
        let n = remove_new_chains(&before);
        if n > 0 {
            done.push(format!("removed {n} KUBE-* iptables chains"));
        }
        for (key, value) in &sysctls {
            if fs::read_to_string(sysctl_path(key)).is_ok_and(|v| v.trim() != value) {
                let _ = fs::write(sysctl_path(key), value);
                done.push(format!("restored {key}={value}"));
            }
        }
        for d in &created {
            if d.exists() {
                unmount_under(d);
                let _ = fs::remove_dir_all(d);
                done.push(format!("removed {}", d.display()));
            }
        }
    }
    if let Some(pid) = dockerd
        && crate::control_plane::pid_alive(pid, "dockerd")
    {
        crate::control_plane::terminate_pids(&[("dockerd".to_owned(), pid)], Duration::from_secs(20));
        done.push(format!("stopped the dockerd it started (pid {pid})"));
    }
    let _ = fs::remove_file(dir.join(STATE_FILE));
    Ok(done)
}

/// Unmounts (lazily) every mount point at or below `root`, deepest first.
fn unmount_under(root: &Path) -> usize {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return 0 };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount(p)))
        .filter(|p| p.starts_with(root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    let mut n = 0;
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { continue };
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            n += 1;
        }
    }
    n
}

fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Deletes the `KUBE-*` chains not in `before` (`"<cmd> <table> <chain>"`):
/// first the rules elsewhere that jump to them, then their rules, then them.
fn remove_new_chains(before: &BTreeSet<String>) -> usize {
    let mut removed = 0;
    for cmd in ["iptables", "ip6tables"] {
        for table in TABLES {
            let new: BTreeSet<String> = kube_chains()
                .into_iter()
                .filter(|(c, t, ch)| c == cmd && t == table && !before.contains(&format!("{c} {t} {ch}")))
                .map(|(_, _, ch)| ch)
                .collect();
            if new.is_empty() {
                continue;
            }
            let Ok(o) = Command::new(cmd).args(["-t", table, "-S"]).output() else { continue };
            for rule in String::from_utf8_lossy(&o.stdout).lines() {
                let Some(spec) = rule.strip_prefix("-A ") else { continue };
                let owner = spec.split_whitespace().next().unwrap_or("");
                let target = rule.split_whitespace().skip_while(|w| *w != "-j" && *w != "-g").nth(1).unwrap_or("");
                if !new.contains(owner) && new.contains(target) {
                    // The rule as iptables printed it, quoting included.
                    let _ = Command::new("sh").arg("-c").arg(format!("{cmd} -t {table} -D {spec}")).status();
                }
            }
            for chain in &new {
                let _ = Command::new(cmd).args(["-t", table, "-F", chain]).status();
            }
            for chain in &new {
                if Command::new(cmd).args(["-t", table, "-X", chain]).status().is_ok_and(|s| s.success()) {
                    removed += 1;
                }
            }
        }
    }
    removed
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The machine-wide node lock (`<cache>/node.lock`, flock): waits while
/// another process's node runs. The kernel releases it when its holder dies.
pub fn lock() -> Result<fs::File> {
    let (path, file) = lock_file()?;
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("control-plane: another node runs on this machine; waiting for {}", path.display());
        // SAFETY: as above.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            bail!("locking {}: {}", path.display(), std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// The node lock if no node runs now (for cleaning up a dead one's
/// leftovers: a running node's chains must not be taken for them).
pub fn try_lock() -> Option<fs::File> {
    let (_, file) = lock_file().ok()?;
    // SAFETY: flock on a descriptor we own.
    (unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } == 0)
        .then_some(file)
}

fn lock_file() -> Result<(PathBuf, fs::File)> {
    let path = cache_root().join("node.lock");
    fs::create_dir_all(cache_root())?;
    let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    Ok((path, file))
}

/// A CA the kubelet trusts for client certificates (`pki/ca.crt`) and the
/// API server's client certificate for the kubelet API
/// (`pki/apiserver-kubelet-client.{crt,key}`, group system:masters).
pub fn kubelet_client_certs(dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    let p = |f: &str| pki.join(f).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fhir-operator-local-node-ca",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "-keyout",
        &p("apiserver-kubelet-client.key"),
        "-out",
        &p("apiserver-kubelet-client.csr"),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p("apiserver-kubelet-client.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("apiserver-kubelet-client.crt"),
    ])
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output().context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
