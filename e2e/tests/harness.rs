//! The control-plane harness itself: it starts a working API server, and
//! whatever way its owner ends, every process it started is stopped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fhir_operator_e2e::client_for;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};

const BIN: &str = env!("CARGO_BIN_EXE_control-plane");

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()), Some(c) if c != 'Z' && c != 'X')
}

fn wait_all_dead(pids: &[u32], within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let living: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if living.is_empty() || Instant::now() > deadline {
            return living;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn owned_control_plane_serves_then_stop_ends_every_process() {
    let parent = tempfile::tempdir().unwrap();
    let mut plane = ControlPlane::start(Some(parent.path()), Lifetime::Owned).expect("start");
    let names: Vec<&str> = plane.pids().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager"]);
    let client = client_for(plane.kubeconfig()).await.expect("client");
    let version = client.apiserver_version().await.expect("server answers");
    println!("started {} from {}", version.git_version, plane.source());
    let pids: Vec<u32> = plane.pids().iter().map(|(_, p)| *p).collect();
    assert!(pids.iter().all(|p| alive(*p)));
    let dir = plane.dir().to_owned();
    plane.stop();
    assert_eq!(wait_all_dead(&pids, Duration::from_secs(1)), Vec::<u32>::new(), "stop() left processes");
    assert!(!dir.exists(), "stop() leaves no directory behind");
}

/// The owner is killed with SIGKILL (no destructor, no atexit): the kernel
/// must still take the control plane down with it.
#[test]
fn a_killed_owner_takes_its_control_plane_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--dir", dir.path().to_str().unwrap(), "run"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn control-plane run");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let ready =
        stdout.lines().map_while(Result::ok).find(|l| l.starts_with("ready ")).expect("`run` printed no ready line");
    let pids: Vec<u32> = ready.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')?.1.parse().ok()).collect();
    assert_eq!(pids.len(), 3, "{ready}");
    assert!(pids.iter().all(|p| alive(*p)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        wait_all_dead(&pids, Duration::from_secs(5)),
        Vec::<u32>::new(),
        "processes outlived their killed owner"
    );
}

/// The same for the servers the tests start themselves: a PostgreSQL
/// server dies with the process that started it, even on SIGKILL (it once
/// outlived a test that nextest's timeout killed).
#[test]
fn a_killed_owner_takes_its_postgres_server_with_it() {
    let mut child =
        Command::new(BIN).arg("postgres").stdout(Stdio::piped()).spawn().expect("spawn control-plane postgres");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let ready = stdout.lines().map_while(Result::ok).find(|l| l.starts_with("ready ")).expect("no ready line");
    let pid: u32 = ready.rsplit_once("pid=").and_then(|(_, p)| p.trim().parse().ok()).expect("pid");
    assert!(alive(pid), "{ready}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(wait_all_dead(&[pid], Duration::from_secs(5)), Vec::<u32>::new(), "postgres outlived its killed owner");
}

fn run(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).arg("--dir").arg(dir).args(args).output().expect("run control-plane");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The path people use: `up` returns with the control plane running, a
/// second `up` refuses, `env` points at it, `down` stops it by pid.
#[test]
fn detached_up_env_status_down() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(dir.path(), &["up"]);
    assert!(ok, "up failed: {err}");
    assert!(out.contains("export KUBECONFIG="), "{out}");
    assert!(err.contains("v1.20.2") || err.contains("KUBEBUILDER_ASSETS"), "up says what it runs: {err}");

    let (ok, _, err) = run(dir.path(), &["up"]);
    assert!(!ok && err.contains("already runs"), "a second up must refuse: {err}");

    let (_, status, _) = run(dir.path(), &["status"]);
    let pids: Vec<u32> = status.lines().filter_map(|l| l.split('\t').nth(1)?.parse().ok()).collect();
    assert_eq!(pids.len(), 3, "{status}");
    assert!(status.lines().all(|l| l.ends_with("running")), "{status}");

    let (ok, env, _) = run(dir.path(), &["env"]);
    assert!(ok && env.contains("USE_EXISTING_CLUSTER=true"), "{env}");

    let (ok, _, err) = run(dir.path(), &["down"]);
    assert!(ok, "down failed: {err}");
    assert_eq!(wait_all_dead(&pids, Duration::from_secs(1)), Vec::<u32>::new(), "down left processes");
    let (_, status, _) = run(dir.path(), &["status"]);
    assert!(status.contains("no control plane"), "{status}");
}

#[test]
fn env_without_a_control_plane_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(dir.path(), &["env"]);
    assert!(!ok);
    assert!(err.contains("no control plane") && err.contains("up"), "{err}");
}
