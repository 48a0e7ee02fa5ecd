//! `control-plane up|down|env|status --dir DIR`: a detached local control
//! plane for people and for `make test` (see e2e/control-plane.sh).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhir_operator_e2e::control_plane::{self, ControlPlane, Lifetime};

#[derive(Parser)]
#[command(about = "A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on loopback")]
struct Cli {
    /// Directory that records the running control plane (pids, kubeconfig, logs).
    #[arg(long, global = true, default_value_os_t = control_plane::cache_root().join("control-plane"))]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a control plane that keeps running after this command exits.
    Up {
        /// With a node (kubelet, kube-proxy, kube-scheduler on the Docker
        /// engine): pods really run. See `e2e/src/node.rs`.
        #[arg(long)]
        node: bool,
    },
    /// Start a control plane and keep it until this command is interrupted
    /// (Ctrl-C) or killed: its processes die with it.
    Run {
        /// With a node, as for `up`.
        #[arg(long)]
        node: bool,
    },
    /// Stop the recorded control plane's processes and remove its directory.
    Down,
    /// Print `export KUBECONFIG=...` for the recorded control plane.
    Env,
    /// Say which recorded processes run.
    Status,
    /// Install (create or replace) the operator's CRDs into the recorded
    /// control plane and wait until they are established.
    Crds,
    /// Bind the operator's RBAC rules to the `fhir-operator` token user and
    /// print the path of that user's kubeconfig.
    Rbac,
    /// Start a PostgreSQL server as the backup tests do (Debian's, on a free
    /// loopback port) and keep it until this command is interrupted or
    /// killed: the server dies with it. Prints `ready port=P pid=N`.
    Postgres,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("control-plane: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn current(dir: &std::path::Path) -> anyhow::Result<Option<PathBuf>> {
    let link = dir.join("current");
    Ok(std::fs::read_link(&link).ok())
}

fn start(dir: &std::path::Path, lifetime: Lifetime, node: bool) -> anyhow::Result<ControlPlane> {
    if node {
        let plane = ControlPlane::start_with_node(Some(dir), lifetime)?;
        if let Some(n) = plane.node() {
            eprintln!("control-plane: node {} on {}, pause image {}", n.name, n.address, n.images.pause);
        }
        Ok(plane)
    } else {
        ControlPlane::start(Some(dir), lifetime)
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli.dir.clone();
    match cli.command {
        Cmd::Up { node } => {
            if let Some(running) = current(&dir)?
                && control_plane::recorded_status(&running)?.iter().any(|(_, _, alive)| *alive)
            {
                anyhow::bail!("a control plane already runs in {}; `down` it first", running.display());
            }
            std::fs::create_dir_all(&dir)?;
            let plane = start(&dir, Lifetime::Detached, node)?;
            let link = dir.join("current");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(plane.dir(), &link)?;
            eprintln!("control-plane: up ({}), Kubernetes {}", plane.source(), control_plane::KUBERNETES_VERSION);
            for (name, pid) in plane.pids() {
                eprintln!("control-plane:   {name} pid {pid}, log {}/{name}.log", plane.dir().display());
            }
            println!("export KUBECONFIG={}", link.join("kubeconfig").display());
        }
        Cmd::Run { node } => {
            std::fs::create_dir_all(&dir)?;
            let plane = start(&dir, Lifetime::Owned, node)?;
            eprintln!("control-plane: running ({}); Ctrl-C stops it", plane.source());
            println!("export KUBECONFIG={}", plane.kubeconfig().display());
            let pids: Vec<String> = plane.pids().iter().map(|(n, p)| format!("{n}={p}")).collect();
            println!("ready {}", pids.join(" "));
            loop {
                std::thread::park();
            }
        }
        Cmd::Postgres => {
            let pg = fhir_operator_e2e::postgres::Postgres::start()?;
            println!("ready port={} pid={}", pg.port, pg.pid());
            loop {
                std::thread::park();
            }
        }
        Cmd::Down => {
            match current(&dir)? {
                Some(running) => {
                    let stopped = control_plane::stop_recorded(&running)?;
                    std::fs::remove_dir_all(&running)?;
                    std::fs::remove_file(dir.join("current"))?;
                    eprintln!("control-plane: stopped {}", stopped.join(", "));
                }
                None => eprintln!("control-plane: nothing recorded in {}; nothing to stop", dir.display()),
            }
            // Leftovers of test processes that were killed (their processes
            // are gone; a node's containers, chains and mounts may not be).
            // The named directory's leftovers wait for another node to end;
            // the temp dir's are left for later while one runs.
            control_plane::reap_stale_dirs(&dir, true);
            control_plane::reap_stale_dirs(&std::env::temp_dir(), false);
        }
        Cmd::Env => {
            let running =
                current(&dir)?.ok_or_else(|| anyhow::anyhow!("no control plane in {}; run `up`", dir.display()))?;
            let (_, source) = control_plane::recorded(&running)?;
            println!("export KUBECONFIG={}", dir.join("current").join("kubeconfig").display());
            println!("export USE_EXISTING_CLUSTER=true");
            println!("export FHIR_E2E_SOURCE='local control plane, {}'", source.replace('\'', ""));
        }
        Cmd::Crds | Cmd::Rbac => {
            let running =
                current(&dir)?.ok_or_else(|| anyhow::anyhow!("no control plane in {}; run `up`", dir.display()))?;
            let (kubeconfig, _) = control_plane::recorded(&running)?;
            let rbac = matches!(cli.command, Cmd::Rbac);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let client = fhir_operator_e2e::client_for(&kubeconfig).await?;
                if rbac {
                    fhir_operator_e2e::operator::grant_rbac(&client).await
                } else {
                    fhir_operator_e2e::install_crds(&client).await
                }
            })?;
            if rbac {
                eprintln!("control-plane: the fhir-operator user has the operator's RBAC rules");
                println!("{}", dir.join("current").join(control_plane::OPERATOR_KUBECONFIG_FILE).display());
            } else {
                eprintln!(
                    "control-plane: CRDs installed: {}",
                    fhir_operator::api::crds().iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
                );
            }
        }
        Cmd::Status => match current(&dir)? {
            Some(running) => {
                for (name, pid, alive) in control_plane::recorded_status(&running)? {
                    println!("{name}\t{pid}\t{}", if alive { "running" } else { "stopped" });
                }
            }
            None => println!("no control plane recorded in {}", dir.display()),
        },
    }
    Ok(())
}
