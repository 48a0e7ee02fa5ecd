//! The audit trail against the real things: the operator's own binary as
//! the `audit-sidecar` and as `audit verify`/`audit query`, a real nginx
//! (Debian package `nginx`) running the rendered gateway configuration
//! with its access log in a file, wrk (Debian package `wrk`) as the load,
//! a directory and a real S3 server (s3s-fs) as destinations.
//!
//! - Under load (at least 2,000 requests/s for 60 s by default;
//!   `AUDIT_LOAD_SECONDS` shortens it), with the sidecar SIGKILLed and
//!   restarted twice: as many records as nginx answered, each once, and
//!   `audit verify` passes. No API key, token or query string reaches a
//!   record, the sidecar's output or its metrics.
//! - Tampering (a byte edited, a record deleted, a segment deleted, two
//!   segments swapped, a checkpoint deleted, a checkpoint re-signed with
//!   another key): `audit verify` fails naming the segment and the record.
//! - Round trips to S3 and to a directory, `audit query` on both.
//! - Retention prunes exactly the expired segments, and verify tells the
//!   pruning from a deletion.
//!
//! Needs the operator binary beside the test binaries (`make test`, or
//! `cargo build -p fhir-operator --bin fhir-operator` first).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fhir_operator::audit::checkpoint::{SignedCheckpoint, parse_signing_key};
use fhir_operator::audit::record::Record;
use fhir_operator::audit::{self, generate_signing_key};
use fhir_operator::fhirendpoint::gateway::{self, GatewaySettings, LimitKey, Limits, Rate};
use fhir_operator_e2e::s3::S3Server;

const STREAM: &str = "gateway-0";
/// A client's API key (as the operator's: 43 characters of base64url).
const API_KEY: &str = "canaryKEY-0123456789abcdefghijklmnopqrstuvw";
/// A bearer token the gateway does not check, sent anyway: it must not
/// reach the trail either.
const TOKEN: &str = "canaryTOKEN.eyJzdWIiOiJkci13aG8ifQ.c2lnbmF0dXJl";
/// A key the gateway does not know (401s).
const WRONG_KEY: &str = "canaryWRONG-0123456789abcdefghijklmnopqrstu";
/// In a query string: PHI the trail never copies.
const QUERY_CANARY: &str = "canaryQUERY";
const PATIENCE: Duration = Duration::from_secs(20);

fn binary() -> PathBuf {
    let binary = fhir_operator_e2e::operator::binary();
    assert!(
        binary.is_file(),
        "{} is missing: build it first (cargo build -p fhir-operator --bin fhir-operator)",
        binary.display()
    );
    binary
}

fn tool(name: &str, package: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: apt-get install {package} (e2e/install.sh does)"))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// nginx runs as nobody when the tests run as root, as in the pod.
fn unprivileged(program: &Path) -> Command {
    if !running_as_root() {
        return Command::new(program);
    }
    let mut command = Command::new(tool("setpriv", "util-linux"));
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(program);
    command
}

fn chown_tree(dir: &Path) {
    if !running_as_root() {
        return;
    }
    std::os::unix::fs::chown(dir, Some(65534), Some(65534)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            chown_tree(&path);
        } else {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind").port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().expect("status") {
            panic!("{what} exited ({status}) before listening on {port}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port} within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill only sends a signal to a process this test started.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// A process group this test started (nginx: master and workers), stopped
/// when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the group is this test's child's own (process_group(0)).
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The key pair files: the private key (for the sidecar) and the public one.
struct Keys {
    private: PathBuf,
    public: PathBuf,
}

fn keys(dir: &Path) -> Keys {
    let pair = generate_signing_key().expect("key pair");
    let keys = Keys { private: dir.join("signing-key.pem"), public: dir.join("public-key.pem") };
    std::fs::write(&keys.private, &pair.private_pem).expect("write key");
    std::fs::write(&keys.public, &pair.public_pem).expect("write key");
    keys
}

/// The `audit-sidecar` process.
struct Sidecar {
    child: Option<Child>,
    log: PathBuf,
    output: PathBuf,
    destination: Vec<String>,
    key: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    pub metrics_port: u16,
    pub starts: u32,
}

impl Sidecar {
    fn new(log: &Path, destination: &[String], key: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let output = log.with_extension("sidecar.out");
        Sidecar {
            child: None,
            log: log.to_owned(),
            output,
            destination: destination.to_vec(),
            key: key.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            metrics_port: free_port(),
            starts: 0,
        }
    }

    fn start(&mut self) {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.output).expect("output file");
        let mut command = Command::new(binary());
        command
            .arg("audit-sidecar")
            .arg("--access-log")
            .arg(&self.log)
            .args(["--stream", STREAM])
            .arg("--signing-key")
            .arg(&self.key)
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(&self.destination)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out);
        let mut child = command.spawn().expect("start the sidecar");
        wait_for_port(self.metrics_port, "the audit sidecar", &mut child);
        self.child = Some(child);
        self.starts += 1;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM: the sidecar reads to the end of the log, seals and exits.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = child.try_wait().expect("status") {
                assert!(status.success(), "the sidecar exited with {status}:\n{}", self.output());
                return;
            }
            assert!(Instant::now() < deadline, "the sidecar did not stop within 180 s:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("connect to /metrics");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        text
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary()).args(args).envs(env.iter().copied()).output().expect("run fhir-operator")
}

fn verify(destination: &[String], keys: &Keys, env: &[(&str, &str)]) -> Output {
    let mut args = vec!["audit", "verify", "--public-key", keys.public.to_str().expect("UTF-8")];
    args.extend(destination.iter().map(String::as_str));
    run(&args, env)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn access_line(time: &str, client: &str, method: &str, path: &str, status: u16) -> String {
    format!(
        r#"{{"time":"{time}","request_id":"req-{status}","client":"{client}","remote_addr":"10.0.0.7","method":"{method}","path":"{path}","status":{status},"request_time":0.004,"upstream_time":"0.003","bytes_sent":10,"tls_protocol":"TLSv1.3"}}"#
    )
}

fn append(log: &Path, lines: &[String]) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
    for line in lines {
        writeln!(file, "{line}").expect("append");
    }
}

/// `count` lines, one second apart from `start` (Unix seconds), patients p0..p4.
fn lines(start: i64, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let time = chrono::DateTime::from_timestamp(start + i as i64, 0).expect("time").to_rfc3339();
            let client = if i % 2 == 0 { "billing" } else { "portal" };
            access_line(&time, client, "GET", &format!("/fhir/Patient/p{}", i % 5), 200)
        })
        .collect()
}

/// The checkpoints of the stream in a directory destination, by index.
fn checkpoints(trail: &Path) -> Vec<SignedCheckpoint> {
    let dir = trail.join(STREAM).join("checkpoints");
    let mut names: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("checkpoints").map(|e| e.expect("entry").path()).collect();
    names.sort();
    names.iter().map(|p| serde_json::from_slice(&std::fs::read(p).expect("read")).expect("checkpoint")).collect()
}

/// Every record in the directory's segments, in sequence order.
fn records(trail: &Path) -> Vec<Record> {
    let dir = trail.join(STREAM).join("segments");
    let mut records: Vec<Record> = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("segments") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("segment");
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            records.push(serde_json::from_slice(line).expect("record"));
        }
    }
    records.sort_by_key(|r| r.seq);
    records
}

fn dir_destination(trail: &Path) -> Vec<String> {
    vec!["--dir".into(), trail.to_str().expect("UTF-8").into()]
}

/// A trail of four segments of five records (`--max-segment-records 5`)
/// and a last, empty checkpoint, in `dir/trail`.
fn four_segments(dir: &Path, keys: &Keys) -> PathBuf {
    let log = dir.join("access.log");
    let trail = dir.join("trail");
    append(&log, &lines(1_767_225_600, 20)); // 2026-01-01T00:00:00Z
    let mut sidecar = Sidecar::new(&log, &dir_destination(&trail), &keys.private, &["--max-segment-records", "5"], &[]);
    sidecar.start();
    wait_until(|| checkpoints_count(&trail) >= 4, "four checkpoints", &sidecar);
    sidecar.stop();
    let sealed = checkpoints(&trail);
    let counts: Vec<u64> = sealed.iter().map(|c| c.checkpoint.count).collect();
    assert_eq!(counts, [5, 5, 5, 5, 0], "{}", sidecar.output());
    trail
}

fn checkpoints_count(trail: &Path) -> usize {
    std::fs::read_dir(trail.join(STREAM).join("checkpoints")).map(|d| d.count()).unwrap_or(0)
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str, sidecar: &Sidecar) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within {PATIENCE:?}:\n{}", sidecar.output());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[test]
fn verify_names_the_segment_and_record_of_each_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys(dir.path());
    let trail = four_segments(dir.path(), &keys);
    let intact = verify(&dir_destination(&trail), &keys, &[]);
    assert!(intact.status.success(), "{}", text(&intact));
    assert!(text(&intact).contains("5 checkpoints (5 signatures verified), 4 segments, 20 records, seq 1..=20"));
    let segment: Vec<String> = checkpoints(&trail).iter().map(|c| c.checkpoint.segment.clone()).collect();
    let path = |t: &Path, i: usize| t.join(STREAM).join(&segment[i]);
    let other_key = parse_signing_key(&generate_signing_key().expect("key").private_pem).expect("key");

    type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Tamper, usize, u64)> = vec![
        (
            "one byte edited in record 8",
            Box::new(|t: &Path| {
                let bytes = std::fs::read(path(t, 1)).expect("read");
                let text = String::from_utf8(bytes).expect("UTF-8");
                let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                assert!(lines[2].contains("\"seq\":8,"));
                lines[2] = lines[2].replacen("\"outcome\":200", "\"outcome\":201", 1);
                std::fs::write(path(t, 1), lines.join("\n") + "\n").expect("write");
            }),
            1,
            8,
        ),
        (
            "record 13 deleted",
            Box::new(|t: &Path| {
                let text = std::fs::read_to_string(path(t, 2)).expect("read");
                let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"seq\":13,")).collect();
                assert_eq!(kept.len(), 4);
                std::fs::write(path(t, 2), kept.join("\n") + "\n").expect("write");
            }),
            2,
            13,
        ),
        ("segment 2 deleted", Box::new(|t: &Path| std::fs::remove_file(path(t, 1)).expect("delete")), 1, 6),
        (
            "segments 2 and 3 swapped",
            Box::new(|t: &Path| {
                let (a, b) = (std::fs::read(path(t, 1)).expect("read"), std::fs::read(path(t, 2)).expect("read"));
                std::fs::write(path(t, 1), b).expect("write");
                std::fs::write(path(t, 2), a).expect("write");
            }),
            1,
            6,
        ),
        (
            "checkpoint 3 re-signed with another key",
            Box::new(move |t: &Path| {
                let file = t.join(STREAM).join("checkpoints/00000000000000000003.json");
                let signed: SignedCheckpoint =
                    serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("parse");
                let forged = SignedCheckpoint::sign(signed.checkpoint, &other_key);
                std::fs::write(&file, forged.to_bytes()).expect("write");
            }),
            2,
            11,
        ),
        (
            "checkpoint 2 and its segment deleted",
            Box::new(|t: &Path| {
                std::fs::remove_file(t.join(STREAM).join("checkpoints/00000000000000000002.json")).expect("delete");
                std::fs::remove_file(path(t, 1)).expect("delete");
            }),
            2,
            6,
        ),
    ];
    for (what, tamper, segment_index, seq) in cases {
        let copy = dir.path().join(what.replace(' ', "-"));
        copy_tree(&trail, &copy);
        tamper(&copy);
        let output = verify(&dir_destination(&copy), &keys, &[]);
        let said = text(&output);
        println!("{what}:\n{said}");
        assert!(!output.status.success(), "{what}: verify passed:\n{said}");
        let named = format!("segment {}, record seq {seq}:", segment[segment_index]);
        assert!(said.contains(&named), "{what}: expected `{named}` in:\n{said}");
    }
}

#[test]
fn round_trips_to_s3_and_to_a_directory_and_answers_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys(dir.path());
    let s3 = S3Server::start("fhir-audit").unwrap_or_else(|e| panic!("{e:#}"));
    let s3_env = s3.credentials(s3.secret_key());
    let s3_destination: Vec<String> =
        ["--s3-bucket", "fhir-audit", "--s3-prefix", "prod/patients", "--s3-endpoint", &s3.endpoint()]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    let trail = dir.path().join("trail");
    for (name, destination, env) in
        [("s3", s3_destination.clone(), &s3_env[..]), ("dir", dir_destination(&trail), &[][..])]
    {
        let log = dir.path().join(format!("{name}.log"));
        append(&log, &lines(1_767_225_600, 12));
        let mut sidecar = Sidecar::new(&log, &destination, &keys.private, &["--max-segment-records", "5"], env);
        sidecar.start();
        // Lines arriving while it runs, in two writes of half a line each.
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).expect("open");
        let line = access_line("2026-01-01T00:01:00Z", "portal", "DELETE", "/fhir/Patient/p9", 204);
        let (head, tail) = line.split_at(40);
        file.write_all(head.as_bytes()).expect("write");
        std::thread::sleep(Duration::from_millis(300));
        writeln!(file, "{tail}").expect("write");
        std::thread::sleep(Duration::from_millis(300));
        sidecar.stop();

        let output = verify(&destination, &keys, env);
        assert!(output.status.success(), "{name}: {}", text(&output));
        assert!(text(&output).contains(", 13 records, seq 1..=13"), "{name}: {}", text(&output));
        let mut args = vec!["audit", "query", "--patient", "p2", "--since", "2026-01-01T00:00:05Z"];
        args.extend(destination.iter().map(String::as_str));
        let query = run(&args, env);
        assert!(query.status.success(), "{name}: {}", text(&query));
        let found: Vec<Record> = String::from_utf8_lossy(&query.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a record per line"))
            .collect();
        let times: Vec<&str> = found.iter().map(|r| r.time.as_str()).collect();
        assert_eq!(times, ["2026-01-01T00:00:07Z"], "{name}: p2 is every fifth line from the third");
        let mut args = vec!["audit", "query", "--client", "portal", "--until", "2026-01-01T00:00:04Z"];
        args.extend(destination.iter().map(String::as_str));
        let query = run(&args, env);
        assert_eq!(String::from_utf8_lossy(&query.stdout).lines().count(), 2, "{name}: {}", text(&query));
    }
    let objects = s3.objects();
    assert!(objects.iter().any(|o| o.starts_with(&format!("prod/patients/{STREAM}/segments/"))), "{objects:?}");
    assert!(
        objects.iter().any(|o| o == &format!("prod/patients/{STREAM}/checkpoints/00000000000000000001.json")),
        "{objects:?}"
    );
    // The same records, byte for byte apart from their times of sealing.
    let local = records(&trail);
    assert_eq!(local.len(), 13);
    assert_eq!(local.last().map(|r| (r.outcome, r.interaction)), Some((204, audit::Interaction::Delete)));
}

#[test]
fn retention_prunes_exactly_the_expired_segments_and_verify_tells_it_from_a_deletion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys(dir.path());
    let log = dir.path().join("access.log");
    let trail = dir.path().join("trail");
    // Ten requests of 2019: two segments; then an empty checkpoint at the stop.
    append(&log, &lines(1_546_300_800, 10));
    let options = ["--max-segment-records", "5", "--retention", "1y"];
    let mut sidecar = Sidecar::new(&log, &dir_destination(&trail), &keys.private, &options, &[]);
    sidecar.start();
    wait_until(|| checkpoints_count(&trail) >= 2, "two checkpoints", &sidecar);
    sidecar.stop();
    let old: Vec<String> =
        checkpoints(&trail).iter().map(|c| c.checkpoint.segment.clone()).filter(|s| !s.is_empty()).collect();
    assert_eq!(old.len(), 2);
    // Five requests of now: the restarted sidecar prunes the two expired
    // segments and their checkpoints, and nothing else.
    let now = chrono::Utc::now().timestamp();
    append(&log, &lines(now - 10, 5));
    sidecar.start();
    wait_until(|| !trail.join(STREAM).join(&old[0]).exists(), "pruning", &sidecar);
    sidecar.stop();
    let left: Vec<u64> = checkpoints(&trail).iter().map(|c| c.checkpoint.index).collect();
    assert_eq!(left.first(), Some(&3), "checkpoints 1 and 2 pruned, the rest kept: {left:?}");
    assert!(old.iter().all(|s| !trail.join(STREAM).join(s).exists()));
    let newest = checkpoints(&trail).pop().expect("a checkpoint");
    let pruned = newest.checkpoint.pruned.expect("the pruning is recorded");
    assert_eq!((pruned.through_index, pruned.through_seq), (2, 10));
    let records = records(&trail);
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), (11..=15).collect::<Vec<_>>());
    let output = verify(&dir_destination(&trail), &keys, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("retention pruned checkpoints 1..=2 (records up to seq 10)"), "{}", text(&output));
    // A deletion of what retention kept is not a pruning.
    std::fs::remove_file(trail.join(STREAM).join("checkpoints/00000000000000000003.json")).expect("delete");
    let output = verify(&dir_destination(&trail), &keys, &[]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("checkpoint 3 is missing"), "{}", text(&output));
}

#[test]
fn a_seal_interrupted_by_a_kill_is_finished_over_exactly_its_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = keys(dir.path());
    let log = dir.path().join("access.log");
    let state = dir.path().join("access.log.audit-state.json");
    let trail = dir.path().join("trail");
    append(&log, &lines(1_767_225_600, 7));
    // A file where the segments directory belongs: the seal of the first
    // five records is begun (its range and time recorded in the state)
    // and cannot finish.
    std::fs::create_dir_all(trail.join(STREAM)).expect("mkdir");
    std::fs::write(trail.join(STREAM).join("segments"), b"in the way").expect("write");
    let options = ["--max-segment-records", "5"];
    let mut sidecar = Sidecar::new(&log, &dir_destination(&trail), &keys.private, &options, &[]);
    sidecar.start();
    let begun = || std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"end_offset\""));
    wait_until(begun, "a seal begun", &sidecar);
    wait_until(|| sidecar.output().contains("cannot write the audit seal"), "a failed seal", &sidecar);
    sidecar.kill();
    // More requests while it is down; then the destination is writable again.
    append(&log, &lines(1_767_225_700, 4));
    std::fs::remove_file(trail.join(STREAM).join("segments")).expect("remove");
    // Segments of up to 100 now: only the recorded range makes the first five.
    sidecar.extra = vec!["--max-segment-records".into(), "100".into()];
    sidecar.start();
    sidecar.stop();
    let output = verify(&dir_destination(&trail), &keys, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains(", 11 records, seq 1..=11"), "{}", text(&output));
    let sealed = checkpoints(&trail);
    let counts: Vec<u64> = sealed.iter().map(|c| c.checkpoint.count).collect();
    assert_eq!(counts, [5, 6], "the begun seal held exactly its five records, the rest came after");
    let times: Vec<&str> = sealed.iter().map(|c| c.checkpoint.first_time.as_str()).collect();
    assert_eq!(times[..2], ["2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z"]);
}

// ---------------------------------------------------------------------------
// Under load

fn load_seconds() -> u64 {
    std::env::var("AUDIT_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

/// nginx answering every proxied request itself with 200.
fn upstream_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/upstream.pid;\nerror_log stderr crit;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log {d}/upstream.log;\n  client_body_temp_path {d}/ub; proxy_temp_path {d}/up;\n  \
         fastcgi_temp_path {d}/uf; uwsgi_temp_path {d}/uu; scgi_temp_path {d}/us;\n  keepalive_requests 1000000;\n  \
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ default_type application/fhir+json; return 200 \
         '{{\"resourceType\":\"Patient\"}}'; }}\n  }}\n}}\n"
    )
}

fn count_lines(path: &Path) -> usize {
    std::fs::read(path).map(|b| b.iter().filter(|c| **c == b'\n').count()).unwrap_or(0)
}

fn start_nginx(conf: &Path, port: u16, what: &str) -> Group {
    let mut child = unprivileged(&tool("nginx", "nginx"))
        .arg("-c")
        .arg(conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start nginx");
    wait_for_port(port, what, &mut child);
    Group(child)
}

#[test]
fn under_load_with_two_kills_every_answered_request_is_recorded_once_and_verifies() {
    let seconds = load_seconds();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let keys = keys(d);
    for sub in ["gw/keys/clients", "gw/run", "logs", "up"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    let (gateway_port, upstream_port) = (free_port(), free_port());
    let path = |p: &str| d.join(p).to_str().expect("UTF-8").to_owned();
    let (certificate, key) =
        fhir_operator::fhirendpoint::tls::issue(&["localhost".to_owned()], k8s_openapi::jiff::Timestamp::now())
            .expect("certificate");
    std::fs::write(d.join("gw/tls.crt"), certificate).expect("write");
    std::fs::write(d.join("gw/tls.key"), key).expect("write");
    std::fs::write(
        d.join("gw/keys/clients/api-keys.map"),
        gateway::api_keys_map(&[(API_KEY.to_owned(), "billing".to_owned())]).expect("key map"),
    )
    .expect("write");
    let settings = GatewaySettings {
        listen: format!("127.0.0.1:{gateway_port}"),
        upstream: format!("127.0.0.1:{upstream_port}"),
        public_host: "localhost".into(),
        public_port: gateway_port,
        tls_certificate: path("gw/tls.crt"),
        tls_certificate_key: path("gw/tls.key"),
        api_keys_map: path("gw/keys/*/api-keys.map"),
        temp_dir: path("gw/run"),
        access_log: path("logs/access.log"),
        access_log_syslog: None,
        limits: Limits {
            key: LimitKey::Client,
            default: Rate { per_second: 100_000, burst: 100_000 },
            read: None,
            write: None,
            max_body_bytes: 1 << 20,
        },
        auth: None,
    };
    let rendered = gateway::nginx_conf(&settings).expect("renders");
    // nginx's own count: a second copy of the same log, which the sidecar never touches.
    let audit_log = format!("access_log {} fhir_audit;", settings.access_log);
    assert!(rendered.contains(&audit_log), "{rendered}");
    let counted = format!("{audit_log}\n    access_log {} fhir_audit;", path("logs/count.log"));
    std::fs::write(d.join("gw/nginx.conf"), rendered.replace(&audit_log, &counted)).expect("write");
    std::fs::write(d.join("up/nginx.conf"), upstream_conf(&d.join("up"), upstream_port)).expect("write");
    chown_tree(d);
    let _upstream = start_nginx(&d.join("up/nginx.conf"), upstream_port, "the upstream nginx");
    let _gateway = start_nginx(&d.join("gw/nginx.conf"), gateway_port, "the gateway nginx");

    let trail = d.join("trail");
    let options = ["--seal-every", "5s", "--max-segment-records", "50000"];
    let mut sidecar = Sidecar::new(&d.join("logs/access.log"), &dir_destination(&trail), &keys.private, &options, &[]);
    sidecar.start();

    // Patients p1..p50, a search with PHI in its query string, the
    // capability statement, and every tenth request with an unknown key.
    let script = d.join("load.lua");
    std::fs::write(
        &script,
        format!(
            r#"local paths = {{}}
for i = 1, 50 do paths[#paths + 1] = "/fhir/Patient/p" .. i end
paths[#paths + 1] = "/fhir/Observation?subject=Patient/{QUERY_CANARY}&code=1234"
paths[#paths + 1] = "/fhir/metadata"
paths[#paths + 1] = "/fhir/Patient/p7/$everything"
local n = 0
wrk.headers["X-API-Key"] = "{API_KEY}"
wrk.headers["Authorization"] = "Bearer {TOKEN}"
request = function()
  n = n + 1
  if n % 10 == 0 then
    return wrk.format("GET", "/fhir/Patient/p1", {{["X-API-Key"] = "{WRONG_KEY}", ["Authorization"] = "Bearer {TOKEN}"}})
  end
  return wrk.format("GET", paths[(n % #paths) + 1])
end
"#
        ),
    )
    .expect("write");
    let connections = 8;
    let started = Instant::now();
    let wrk = Command::new(tool("wrk", "wrk"))
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(&script)
        .arg(format!("https://127.0.0.1:{gateway_port}/fhir/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wrk");
    // Two SIGKILLs during the load, a third and two thirds of the way.
    for third in 1..=2u32 {
        let at = Duration::from_secs(seconds) * third / 3;
        std::thread::sleep(at.saturating_sub(started.elapsed()));
        sidecar.kill();
        std::thread::sleep(Duration::from_millis(500));
        sidecar.start();
    }
    let wrk = wrk.wait_with_output().expect("wrk");
    let elapsed = started.elapsed();
    let wrk_text = String::from_utf8_lossy(&wrk.stdout).into_owned();
    assert!(wrk.status.success(), "wrk: {wrk_text}{}", String::from_utf8_lossy(&wrk.stderr));
    let wrk_requests: usize = wrk_text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{wrk_text}"));
    // nginx writes each line as it answers; a moment for the last ones.
    std::thread::sleep(Duration::from_millis(500));
    let metrics = sidecar.metrics();
    let drain = Instant::now();
    sidecar.stop();
    let drained = drain.elapsed();

    let answered = count_lines(&d.join("logs/count.log"));
    let proxied = count_lines(&d.join("up/upstream.log"));
    let records = records(&trail);
    let seqs: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    let rate = answered as f64 / seconds as f64;
    let unauthorized = records.iter().filter(|r| r.outcome == 401).count();
    println!(
        "load: {seconds} s (wall {:.1} s), wrk counted {wrk_requests} answers, nginx logged {answered} ({rate:.0}/s), \
         {proxied} reached the upstream, {unauthorized} refused (401); sidecar started {} times (2 SIGKILLs), \
         drained and sealed in {:.1} s after the load; {} records, {} checkpoints",
        elapsed.as_secs_f64(),
        sidecar.starts,
        drained.as_secs_f64(),
        records.len(),
        checkpoints(&trail).len(),
    );
    println!("wrk:\n{wrk_text}");
    assert_eq!(records.len(), answered, "one record per request nginx answered");
    assert_eq!(seqs.len(), records.len(), "no record twice");
    assert_eq!(seqs.iter().next_back().copied(), Some(records.len() as u64), "seq 1..=n without a gap");
    assert_eq!(answered - unauthorized, proxied, "every authorized request reached the upstream, once");
    // wrk stops counting at its deadline with up to one request in flight per connection.
    assert!(
        (wrk_requests..=wrk_requests + connections).contains(&answered),
        "nginx answered {answered}, wrk counted {wrk_requests}"
    );
    assert!(rate >= 2000.0, "the load reached {rate:.0} requests/s, below the 2,000 asked");
    assert!(
        unauthorized > 0 && metrics.contains("fhir_gateway_client_distinct_patients{client=\"billing\"} 50"),
        "{metrics}"
    );

    let output = verify(&dir_destination(&trail), &keys, &[]);
    println!("{}", text(&output));
    assert!(output.status.success(), "{}", text(&output));

    // The sealed part of the access log was given back to the filesystem in
    // place (where it can punch holes, as ext4, xfs and tmpfs can).
    use std::os::unix::fs::MetadataExt;
    let log = std::fs::metadata(d.join("logs/access.log")).expect("access log");
    println!("access log: {} bytes long, {} bytes on disk", log.len(), log.blocks() * 512);
    assert!(log.blocks() * 512 < log.len() / 2, "the sealed part of the log still takes its space");

    // The canary rule: no key, token or query string anywhere the sidecar writes.
    let mut written = vec![sidecar.output(), metrics];
    for entry in walk(&trail) {
        written.push(String::from_utf8_lossy(&std::fs::read(entry).expect("read")).into_owned());
    }
    for canary in [API_KEY, TOKEN, WRONG_KEY, QUERY_CANARY] {
        assert!(written.iter().all(|w| !w.contains(canary)), "{canary} leaked");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        if entry.path().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}
