//! A real node (kubelet + dockershim, kube-proxy, kube-scheduler) on top of
//! the local control plane: pods really run, Services really answer, and
//! stopping it leaves nothing behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fhir_operator_e2e::client_for;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::node;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_control-plane");

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()), Some(c) if c != 'Z' && c != 'X')
}

/// Whether Docker still holds a container whose ID starts with `id`
/// (read from its state directory: works whether or not the engine runs).
fn container_exists(id: &str) -> bool {
    std::fs::read_dir("/var/lib/docker/containers")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(id)))
        .unwrap_or(false)
}

/// One HTTP/1.0 GET; the whole response, or why none came.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

async fn wait<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_node_runs_a_restricted_pod_that_answers_through_its_cluster_ip_and_leaves_nothing_behind() {
    let chains_before = node::kube_chains();
    let log_dirs_before: Vec<bool> =
        ["/var/log/pods", "/var/log/containers"].iter().map(|d| Path::new(d).exists()).collect();
    let t0 = Instant::now();
    let mut plane = ControlPlane::start_with_node(None, Lifetime::Owned).expect("control plane with a node");
    let started = t0.elapsed();
    let info = plane.node().expect("a node").clone();
    let client = client_for(plane.kubeconfig()).await.expect("client");

    // The node registers and becomes Ready, without its not-ready taint.
    let nodes: Api<Node> = Api::all(client.clone());
    let t_node = Instant::now();
    wait("node Ready and untainted", Duration::from_secs(90), || {
        let nodes = nodes.clone();
        let name = info.name.clone();
        async move {
            let n = nodes.get_opt(&name).await.ok()??;
            let ready =
                n.status.as_ref()?.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let tainted = n.spec.as_ref()?.taints.as_ref().is_some_and(|t| !t.is_empty());
            (ready && !tainted).then_some(())
        }
    })
    .await;
    let node_ready = t_node.elapsed();

    // A Pod Security "restricted" pod of the locally built nginx image.
    let ns = "node-e2e";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(json!({
        "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}
    }))
    .unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.expect("namespace");
    // The service account controller makes `default`; pods wait for it.
    let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    wait("default service account", Duration::from_secs(30), || {
        let sa = sa.clone();
        async move { sa.get_opt("default").await.ok()?.map(|_| ()) }
    })
    .await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"}
                    },
                    "containers": [{
                        "name": "nginx",
                        "image": info.images.nginx,
                        "imagePullPolicy": "Never",
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        },
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "32Mi"},
                            "limits": {"cpu": "50m", "memory": "32Mi"}
                        },
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
                    }, {
                        // Calls the pod's own Service (hairpin), from the
                        // Service's environment variables; prints the answers.
                        "name": "hairpin",
                        "image": info.images.nginx,
                        "imagePullPolicy": "Never",
                        "command": ["bash", "-c",
                            "while :; do (exec 3<>/dev/tcp/$WEB_SERVICE_HOST/$WEB_SERVICE_PORT \
                             && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 2 cat <&3 | tail -n 1); sleep 1; done"],
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}
                        },
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "16Mi"},
                            "limits": {"cpu": "10m", "memory": "16Mi"}
                        }
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}]
                }
            }
        }
    }))
    .unwrap();
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let t_pod = Instant::now();
    // The Service first: the pod gets its WEB_SERVICE_* variables.
    let svc = services.create(&PostParams::default(), &service).await.expect("service");
    deployments.create(&PostParams::default(), &deployment).await.expect("deployment");
    let pod = wait("pod Ready", Duration::from_secs(90), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
            list.items.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        }
    })
    .await;
    let pod_ready = t_pod.elapsed();
    let pod_name = pod.metadata.name.clone().unwrap();
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(info.name.as_str()));

    // From the host, through the ClusterIP (kube-proxy's iptables rules):
    // the body names the pod, so nothing else on that address can pass.
    let ip = svc.spec.unwrap().cluster_ip.unwrap();
    let addr: SocketAddr = format!("{ip}:80").parse().unwrap();
    let expected = format!("fhir-operator test nginx on {pod_name}\n");
    let t_svc = Instant::now();
    let mut last;
    let response = loop {
        match http_get(addr, "/") {
            Ok(r) if r.ends_with(&expected) => break r,
            Ok(r) => last = r,
            Err(e) => last = e,
        }
        assert!(t_svc.elapsed() < Duration::from_secs(30), "no answer from the pod through {addr}: {last:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let service_answers = t_svc.elapsed();

    // The pod through its own Service: needs hairpin mode on its bridge
    // port, which an engine the harness started has.
    let hairpin = if info.started_docker {
        let t = Instant::now();
        let logs = wait("the pod answers itself through its Service", Duration::from_secs(30), || {
            let pods = pods.clone();
            let name = pod_name.clone();
            let expected = expected.clone();
            async move {
                let params = kube::api::LogParams { container: Some("hairpin".into()), ..Default::default() };
                let logs = pods.logs(&name, &params).await.ok()?;
                logs.contains(expected.trim_end()).then_some(logs)
            }
        })
        .await;
        assert!(logs.contains(&pod_name));
        format!("{:.1?}", t.elapsed())
    } else {
        eprintln!("node: the Docker engine ran before this test; hairpin not checked");
        "not checked".to_owned()
    };

    // What must go with the node.
    let root = plane.dir().join("kubelet");
    let containers = node::node_containers(&root);
    assert!(containers.len() >= 2, "the pod's sandbox and nginx containers: {containers:?}");
    let pids: Vec<(String, u32)> = plane.pids().to_vec();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"]);
    assert!(node::kube_chains().len() > chains_before.len(), "kube-proxy made its chains");
    let dir = plane.dir().to_owned();
    let t_stop = Instant::now();
    plane.stop();
    let stopped = t_stop.elapsed();

    let living: Vec<&(String, u32)> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(living.is_empty(), "processes left: {living:?}");
    let left: Vec<&String> = containers.iter().filter(|c| container_exists(c)).collect();
    assert!(left.is_empty(), "containers left: {left:?}");
    assert_eq!(node::kube_chains(), chains_before, "KUBE-* iptables chains left");
    assert!(!dir.exists(), "the control plane directory is gone");
    for (d, existed) in ["/var/log/pods", "/var/log/containers"].iter().zip(log_dirs_before) {
        assert_eq!(Path::new(d).exists(), existed, "{d}");
    }
    println!(
        "timings: control plane + node started {started:.1?}, node Ready {node_ready:.1?}, \
         pod Ready {pod_ready:.1?}, ClusterIP answered {service_answers:.1?}, \
         pod through its own Service {hairpin}, stop {stopped:.1?}"
    );
}

fn restricted_pod(image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}
            },
            "containers": [{
                "name": "nginx", "image": image, "imagePullPolicy": "Never",
                "securityContext": {
                    "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}
                },
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}]
        }
    }))
    .unwrap()
}

/// The owner of a control plane with a node is killed with SIGKILL while a
/// pod runs: its processes die with it, its containers, chains and mounts
/// stay, and `control-plane down` (as would the next start) removes them.
#[tokio::test]
async fn containers_chains_and_mounts_of_a_killed_owner_are_removed_by_down() {
    let chains_before = node::kube_chains();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["--dir", dir.path().to_str().unwrap(), "run", "--node"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn control-plane run --node");
    let mut kubeconfig = None;
    let mut pids = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        if let Some(k) = line.strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(k.to_owned());
        }
        if let Some(rest) = line.strip_prefix("ready ") {
            pids = rest.split_whitespace().filter_map(|kv| kv.split_once('=')?.1.parse::<u32>().ok()).collect();
            break;
        }
    }
    assert_eq!(pids.len(), 6, "six processes: {pids:?}");
    let kubeconfig = kubeconfig.expect("a kubeconfig line");
    let plane_dir = Path::new(&kubeconfig).parent().unwrap().to_owned();
    let client = client_for(Path::new(&kubeconfig)).await.expect("client");
    let images = node::Images::build().expect("images");
    let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait("default service account", Duration::from_secs(30), || {
        let sa = sa.clone();
        async move { sa.get_opt("default").await.ok()?.map(|_| ()) }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &restricted_pod(&images.nginx)).await.expect("pod");
    wait("pod Ready", Duration::from_secs(120), || {
        let pods = pods.clone();
        async move {
            let p = pods.get_opt("web").await.ok()??;
            p.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
        }
    })
    .await;
    let containers = node::node_containers(&plane_dir.join("kubelet"));
    assert!(containers.len() >= 2, "{containers:?}");

    child.kill().unwrap(); // SIGKILL: no destructor, no atexit
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pids.iter().all(|p| !alive(*p)), "processes survived their owner");
    assert!(containers.iter().all(|c| container_exists(c)), "the containers outlive the kubelet");
    assert_ne!(node::kube_chains(), chains_before, "so do kube-proxy's chains");

    let out = Command::new(BIN).args(["--dir", dir.path().to_str().unwrap(), "down"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("down: {}", String::from_utf8_lossy(&out.stderr).trim());
    let left: Vec<&String> = containers.iter().filter(|c| container_exists(c)).collect();
    assert!(left.is_empty(), "containers left: {left:?}");
    assert_eq!(node::kube_chains(), chains_before, "KUBE-* iptables chains left");
    assert!(!plane_dir.exists(), "the dead control plane's directory is gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(plane_dir.to_str().unwrap()), "mounts left under {}", plane_dir.display());
}
