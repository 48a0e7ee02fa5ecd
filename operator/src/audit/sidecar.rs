//! `fhir-operator audit-sidecar`: follows the gateway's access log (see
//! `tail`), chains a record per line, seals a segment and a signed
//! checkpoint into the destination every `--seal-every` (and when a
//! segment is full, and at shutdown), prunes what retention lets go, and
//! serves the gateway's metrics, counted from the same lines.
//!
//! Lossless across a kill: the state file (beside the log, on the same
//! emptyDir) holds the offset up to which everything is sealed, and is
//! replaced atomically only after the segment and the checkpoint are
//! written (and, in a directory, synced). Before writing them the sidecar
//! records its intent (the range and the seal time), so a sidecar killed
//! half-way seals exactly the same records into exactly the same objects
//! when it starts again: nothing lost, nothing twice.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::chain::{Chain, GENESIS};
use super::checkpoint::{Checkpoint, Pruned, SignedCheckpoint, VERSION, checkpoint_name, key_id, parse_signing_key};
use super::metrics::AuditMetrics;
use super::record::{AccessLine, Record, format_time, parse_time};
use super::retention::{self, DEFAULT_RETENTION};
use super::segment::Pending;
use super::store::{AuditStore, DestinationArgs};
use super::tail::{FileId, Follower};
use crate::fhirendpoint::gateway::METRICS_PORT;
use crate::gateway_metrics::{AccessLogEntry, GatewayMetrics};

/// Command-line arguments of `fhir-operator audit-sidecar`.
#[derive(clap::Args, Debug, Clone)]
pub struct SidecarArgs {
    /// The access log nginx appends to (on an emptyDir shared with nginx).
    #[arg(long, value_name = "FILE")]
    pub access_log: PathBuf,
    /// The follower's state (default: `<access log>.audit-state.json`,
    /// beside it on the same emptyDir).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// This sidecar's chain in the destination: one per gateway pod.
    #[arg(long, value_name = "NAME", env = "HOSTNAME")]
    pub stream: String,
    /// The Ed25519 private key (PKCS#8 PEM) checkpoints are signed with.
    #[arg(long, value_name = "FILE")]
    pub signing_key: PathBuf,
    /// How often a segment and a checkpoint are sealed.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = retention::duration_arg)]
    pub seal_every: Duration,
    /// A segment is sealed early when it holds this many records.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_segment_records: u64,
    /// After SIGTERM, keep following the log this long before the last
    /// seal: nginx still serves (and logs) while its pod drains.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Whole segments whose last record is older than this are pruned.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_RETENTION, value_parser = retention::duration_arg)]
    pub retention: Duration,
    /// Window of `fhir_gateway_client_distinct_patients`.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = retention::duration_arg)]
    pub patients_window: Duration,
    #[command(flatten)]
    pub destination: DestinationArgs,
    /// TCP address of the `/metrics` and `/healthz` HTTP endpoint.
    #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)))]
    pub metrics_listen: SocketAddr,
    /// PEM certificate the gateway serves (its expiry is exported).
    #[arg(long, value_name = "PATH")]
    pub tls_certificate: Option<PathBuf>,
}

/// Why the sidecar stopped.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the signing key {path}: {source}")]
    Key { path: String, source: super::checkpoint::KeyError },
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error("the state file {path}: {message}")]
    State { path: String, message: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SidecarError {
    let what = what.into();
    move |source| SidecarError::Io { what, source }
}

/// A seal begun: its range and time, fixed before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealing {
    pub end_offset: u64,
    pub sealed_at: String,
    pub pruned: Option<Pruned>,
}

/// The follower's persisted state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub stream: String,
    /// The access log being followed; `None` until it is first opened.
    pub file: Option<FileId>,
    /// Every line before this offset is sealed.
    pub offset: u64,
    pub next_seq: u64,
    pub head: String,
    /// Time of the last record sealed: an unreadable line after it gets
    /// its time (so that a seal done again after a kill is the same).
    pub last_time: String,
    /// The last checkpoint written (0: none) and its hash.
    pub checkpoint_index: u64,
    pub checkpoint_hash: String,
    /// When the last seal was (the next period's start).
    pub period_end: String,
    pub pruned: Option<Pruned>,
    /// To be carried by the next checkpoint.
    pub source_reset: String,
    pub sealing: Option<Sealing>,
}

impl State {
    /// A new stream, or one continued after the destination's newest
    /// checkpoint when the state was lost.
    pub fn start(stream: &str, now: &str, newest: Option<&Checkpoint>) -> State {
        match newest {
            None => State {
                stream: stream.to_owned(),
                file: None,
                offset: 0,
                next_seq: 1,
                head: GENESIS.to_owned(),
                last_time: now.to_owned(),
                checkpoint_index: 0,
                checkpoint_hash: GENESIS.to_owned(),
                period_end: now.to_owned(),
                pruned: None,
                source_reset: String::new(),
                sealing: None,
            },
            Some(cp) => State {
                stream: stream.to_owned(),
                file: None,
                offset: 0,
                next_seq: cp.last_seq + 1,
                head: cp.head.clone(),
                last_time: if cp.last_time.is_empty() { cp.period_end.clone() } else { cp.last_time.clone() },
                checkpoint_index: cp.index,
                checkpoint_hash: cp.hash(),
                period_end: cp.period_end.clone(),
                pruned: cp.pruned.clone(),
                source_reset: format!(
                    "the sidecar's state was lost: the chain continues after checkpoint {}; access-log lines \
                     before this segment may be missing, or repeated if the log outlived the state",
                    cp.index
                ),
                sealing: None,
            },
        }
    }

    fn chain(&self) -> Chain {
        Chain { next_seq: self.next_seq, head: self.head.clone() }
    }

    /// The checkpoint sealing `pending` (chained from this state to `chain`).
    pub fn checkpoint(&self, pending: &Pending, chain: &Chain, sealing: &Sealing, key: &SigningKey) -> Checkpoint {
        let (segment, segment_sha256) =
            if pending.count > 0 { (pending.name(), pending.sha256()) } else { (String::new(), String::new()) };
        Checkpoint {
            version: VERSION,
            stream: self.stream.clone(),
            index: self.checkpoint_index + 1,
            prev_checkpoint: self.checkpoint_hash.clone(),
            segment,
            segment_sha256,
            first_seq: self.next_seq,
            last_seq: chain.next_seq - 1,
            count: pending.count,
            first_time: pending.first_time.clone(),
            last_time: pending.last_time.clone(),
            head: chain.head.clone(),
            period_start: self.period_end.clone(),
            period_end: sealing.sealed_at.clone(),
            pruned: sealing.pruned.clone(),
            source_reset: self.source_reset.clone(),
            key_id: key_id(&key.verifying_key()),
        }
    }
}

/// Replaces `path` atomically: a temporary file beside it, synced, renamed
/// over it, and the directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

fn load_state(path: &Path) -> Result<Option<State>, SidecarError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SidecarError::State { path: path.display().to_string(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

struct Sidecar {
    args: SidecarArgs,
    state_path: PathBuf,
    key: SigningKey,
    store: AuditStore,
    state: State,
    chain: Chain,
    pending: Pending,
    /// End offset of the last line in `pending`.
    pending_end: u64,
    /// Time of the last record chained, sealed or not.
    last_time: String,
    gateway: Arc<GatewayMetrics>,
    audit: Arc<AuditMetrics>,
    last_prune_check: Option<std::time::Instant>,
}

/// How often the pruning is planned at most (it lists the checkpoints).
const PRUNE_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Pause at the end of the file before looking again.
const POLL: Duration = Duration::from_millis(50);
/// Pause between attempts to write a seal the destination refused.
const RETRY: Duration = Duration::from_secs(5);

impl Sidecar {
    fn save(&self) -> Result<(), SidecarError> {
        let bytes = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        write_atomically(&self.state_path, &bytes).map_err(io(format!("writing {}", self.state_path.display())))
    }

    /// Chains one access-log line and counts it in the metrics.
    fn take_line(&mut self, line: &[u8], end: u64) {
        let record = match serde_json::from_slice::<AccessLine>(line) {
            Ok(access) if parse_time(&access.time).is_some() => {
                let time = parse_time(&access.time).unwrap_or_else(Utc::now);
                self.gateway.observe(&AccessLogEntry {
                    client: access.client.clone(),
                    method: access.method.clone(),
                    status: access.status,
                    request_time: if access.request_time.is_finite() { access.request_time.max(0.0) } else { 0.0 },
                });
                let record = Record::from_access(&access, time);
                if !record.patient.is_empty() {
                    self.audit.observe_patient(&record.client, &record.patient, time.timestamp());
                }
                record
            }
            _ => {
                self.gateway.observe_unreadable();
                Record::from_log_line(line, &self.last_time)
            }
        };
        self.last_time = record.time.clone();
        self.pending.push(&mut self.chain, record);
        self.pending_end = end;
        self.audit.records.inc();
    }

    /// What the next checkpoint prunes, if the hourly check finds more expired.
    async fn plan_pruning(&mut self, now: chrono::DateTime<Utc>) -> Option<Pruned> {
        let due = self.last_prune_check.is_none_or(|t| t.elapsed() >= PRUNE_CHECK_EVERY);
        if !due {
            return self.state.pruned.clone();
        }
        self.last_prune_check = Some(std::time::Instant::now());
        let checkpoints = match self.store.checkpoints(&self.state.stream).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list checkpoints for retention; pruning later");
                return self.state.pruned.clone();
            }
        };
        let parsed: Vec<Checkpoint> = checkpoints
            .iter()
            .filter_map(|(_, bytes)| serde_json::from_slice::<SignedCheckpoint>(bytes).ok())
            .map(|s| s.checkpoint)
            .filter(|c| c.index <= self.state.checkpoint_index)
            .collect();
        retention::plan(&parsed, self.state.pruned.as_ref(), self.args.retention, now).or(self.state.pruned.clone())
    }

    /// Seals `pending`: records the intent, writes the segment and the
    /// checkpoint (retrying until the destination takes them), then
    /// commits the state and lets go of what that allows.
    async fn seal(&mut self) -> Result<(), SidecarError> {
        if self.state.sealing.is_none() {
            let now = Utc::now();
            let pruned = self.plan_pruning(now).await;
            self.state.sealing = Some(Sealing { end_offset: self.pending_end, sealed_at: format_time(now), pruned });
            self.save()?;
        }
        let Some(sealing) = self.state.sealing.clone() else { return Ok(()) };
        let checkpoint = self.state.checkpoint(&self.pending, &self.chain, &sealing, &self.key);
        let signed = SignedCheckpoint::sign(checkpoint, &self.key);
        loop {
            let written = async {
                if self.pending.count > 0 {
                    self.store.put(&self.state.stream, &self.pending.name(), self.pending.bytes.clone()).await?;
                }
                self.store.put_checkpoint(&signed).await
            };
            match written.await {
                Ok(()) => break,
                Err(e) => {
                    self.audit.seal_errors.inc();
                    tracing::warn!(error = %e, "cannot write the audit seal; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        let previous_pruned = self.state.pruned.clone();
        let cp = &signed.checkpoint;
        self.state.offset = sealing.end_offset;
        self.state.next_seq = self.chain.next_seq;
        self.state.head = self.chain.head.clone();
        self.state.checkpoint_index = cp.index;
        self.state.checkpoint_hash = cp.hash();
        self.state.period_end = sealing.sealed_at.clone();
        self.state.last_time = self.last_time.clone();
        self.state.pruned = sealing.pruned.clone();
        self.state.source_reset.clear();
        self.state.sealing = None;
        self.save()?;
        self.audit.seals.inc();
        self.audit.last_seal.set(parse_time(&cp.period_end).map_or(0, |t| t.timestamp()));
        tracing::info!(checkpoint = cp.index, records = cp.count, last_seq = cp.last_seq, "sealed");
        self.pending = Pending::new(self.chain.next_seq);
        if let Some(pruned) = &self.state.pruned
            && previous_pruned.as_ref() != Some(pruned)
        {
            self.delete_pruned(pruned.clone()).await;
        }
        Ok(())
    }

    /// Deletes what a recorded pruning covers, oldest first (a failure is
    /// retried at the next pruning: verify tolerates leftovers).
    async fn delete_pruned(&self, pruned: Pruned) {
        let stream = &self.state.stream;
        let checkpoints = match self.store.checkpoints(stream).await {
            Ok(found) => found,
            Err(e) => return tracing::warn!(error = %e, "cannot list checkpoints to prune"),
        };
        for (index, bytes) in checkpoints.into_iter().filter(|(i, _)| *i <= pruned.through_index) {
            if let Ok(signed) = serde_json::from_slice::<SignedCheckpoint>(&bytes)
                && !signed.checkpoint.segment.is_empty()
                && let Err(e) = self.store.delete(stream, &signed.checkpoint.segment).await
            {
                return tracing::warn!(error = %e, "cannot prune a segment");
            }
            if let Err(e) = self.store.delete(stream, &checkpoint_name(index)).await {
                return tracing::warn!(error = %e, "cannot prune a checkpoint");
            }
        }
        tracing::info!(through_checkpoint = pruned.through_index, through_seq = pruned.through_seq, "pruned");
    }
}

/// Waits for the access log to exist (nginx creates it when it starts).
async fn open_follower(path: &Path, state: &mut State, audit: &AuditMetrics) -> Result<Follower, SidecarError> {
    loop {
        match Follower::open(path, state.offset, state.file) {
            Ok((follower, reset)) => {
                if let Some(reset) = reset {
                    tracing::error!(%reset, "reading the access log from its start");
                    audit.source_resets.inc();
                    state.source_reset = reset.to_string();
                    state.offset = 0;
                    state.sealing = None;
                }
                state.file = Some(follower.id());
                return Ok(follower);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => tokio::time::sleep(POLL).await,
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        }
    }
}

/// Runs the sidecar until SIGTERM or SIGINT, then seals what was read.
pub async fn run(args: SidecarArgs) -> Result<(), SidecarError> {
    // First of all: a SIGTERM that comes while the sidecar starts (the pod
    // deleted at once, or the metrics port just answering) must stop it
    // cleanly, not kill it before it seals what it read.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing the SIGTERM handler"))?;
    let key_text =
        std::fs::read_to_string(&args.signing_key).map_err(io(format!("reading {}", args.signing_key.display())))?;
    let key = parse_signing_key(&key_text)
        .map_err(|source| SidecarError::Key { path: args.signing_key.display().to_string(), source })?;
    let store = AuditStore::open(&args.destination)?;
    let state_path = args.state.clone().unwrap_or_else(|| {
        let mut name = args.access_log.clone().into_os_string();
        name.push(".audit-state.json");
        PathBuf::from(name)
    });
    let mut gateway = GatewayMetrics::new(args.tls_certificate.is_some());
    let audit = Arc::new(AuditMetrics::new(gateway.registry_mut(), args.patients_window.as_secs() as i64));
    let gateway = Arc::new(gateway);
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(io(format!("listening on {}", args.metrics_listen)))?;
    let server =
        tokio::spawn(crate::gateway_metrics::serve(listener, Arc::clone(&gateway), args.tls_certificate.clone()));

    let mut state = match load_state(&state_path)? {
        Some(state) if state.stream == args.stream => state,
        _ => {
            // Without a state the chain continues after the destination's
            // newest checkpoint, so the destination must answer first.
            let newest = loop {
                match store.newest_checkpoint(&args.stream).await {
                    Ok(newest) => break newest,
                    Err(e) => {
                        audit.seal_errors.inc();
                        tracing::warn!(error = %e, "cannot read the destination's newest checkpoint; retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            let state = State::start(&args.stream, &format_time(Utc::now()), newest.as_ref().map(|s| &s.checkpoint));
            if newest.is_some() {
                audit.source_resets.inc();
            }
            state
        }
    };
    let mut follower = open_follower(&args.access_log, &mut state, &audit).await?;
    let chain = state.chain();
    let mut sidecar = Sidecar {
        pending: Pending::new(chain.next_seq),
        pending_end: state.offset,
        last_time: state.last_time.clone(),
        chain,
        state,
        state_path,
        key,
        store,
        gateway,
        audit,
        args,
        last_prune_check: None,
    };
    sidecar.save()?;
    tracing::info!(stream = %sidecar.state.stream, offset = sidecar.state.offset, next_seq = sidecar.state.next_seq, "audit sidecar following the access log");

    let mut next_seal = tokio::time::Instant::now() + sidecar.args.seal_every;
    let mut stopping = false;
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        if stopping && stop_at.is_none() {
            stop_at = Some(tokio::time::Instant::now() + sidecar.args.shutdown_grace);
            tracing::info!(grace = ?sidecar.args.shutdown_grace, "stopping: following the log until the gateway has drained");
        }
        // A seal begun before a restart is finished first, over exactly its range.
        if let Some(sealing) = &sidecar.state.sealing
            && sidecar.pending_end >= sealing.end_offset
        {
            sidecar.seal().await?;
        }
        if tokio::time::Instant::now() >= next_seal && sidecar.state.sealing.is_none() {
            sidecar.seal().await?;
            sidecar.audit.sweep_patients(Utc::now().timestamp());
            if let Err(e) = follower.release(sidecar.state.offset) {
                tracing::debug!(error = %e, "cannot release the sealed part of the access log");
            }
            next_seal = tokio::time::Instant::now() + sidecar.args.seal_every;
        }
        let lines = follower.read_lines().map_err(io("reading the access log"))?;
        if lines.is_empty() {
            if sidecar.state.sealing.is_none() {
                if stop_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
                    sidecar.seal().await?;
                    if let Err(e) = follower.release(sidecar.state.offset) {
                        tracing::debug!(error = %e, "cannot release the sealed part of the access log");
                    }
                    server.abort();
                    return Ok(());
                }
                if let Some(reset) = follower.check().map_err(io("checking the access log"))? {
                    sidecar.seal().await?;
                    sidecar.state.offset = 0;
                    sidecar.state.file = None;
                    follower =
                        open_follower(&sidecar.args.access_log.clone(), &mut sidecar.state, &sidecar.audit).await?;
                    sidecar.state.source_reset = reset.to_string();
                    sidecar.audit.source_resets.inc();
                    sidecar.pending_end = 0;
                    sidecar.save()?;
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = terminate.recv() => stopping = true,
                _ = tokio::signal::ctrl_c() => stopping = true,
            }
            continue;
        }
        for (line, end) in lines {
            sidecar.take_line(&line, end);
            let intent_reached = sidecar.state.sealing.as_ref().is_some_and(|s| s.end_offset == end);
            if intent_reached
                || (sidecar.state.sealing.is_none() && sidecar.pending.count >= sidecar.args.max_segment_records)
            {
                sidecar.seal().await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_state_continues_the_chain_after_the_newest_checkpoint_and_says_so() {
        let fresh = State::start("gw-0", "2026-01-01T00:00:00Z", None);
        assert_eq!((fresh.next_seq, fresh.head.as_str(), fresh.checkpoint_index), (1, GENESIS, 0));
        assert!(fresh.source_reset.is_empty());

        let key = parse_signing_key(&super::super::generate_signing_key().expect("key").private_pem).expect("key");
        let mut chain = fresh.chain();
        let mut pending = Pending::new(chain.next_seq);
        pending.push(&mut chain, Record::from_log_line(b"x", "2026-01-01T00:00:01Z"));
        let sealing = Sealing { end_offset: 2, sealed_at: "2026-01-01T00:05:00Z".into(), pruned: None };
        let first = fresh.checkpoint(&pending, &chain, &sealing, &key);
        assert_eq!((first.index, first.first_seq, first.last_seq, first.count), (1, 1, 1, 1));
        assert_eq!(
            (first.period_start.as_str(), first.period_end.as_str()),
            ("2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z")
        );

        let resumed = State::start("gw-0", "2026-01-02T00:00:00Z", Some(&first));
        assert_eq!((resumed.next_seq, resumed.head.as_str(), resumed.checkpoint_index), (2, first.head.as_str(), 1));
        assert_eq!(
            (resumed.checkpoint_hash.clone(), resumed.period_end.as_str()),
            (first.hash(), "2026-01-01T00:05:00Z")
        );
        assert!(resumed.source_reset.contains("after checkpoint 1"));
        // An empty seal keeps the head and carries the reset.
        let empty = resumed.checkpoint(&Pending::new(2), &resumed.chain(), &sealing, &key);
        assert_eq!((empty.first_seq, empty.last_seq, empty.count, empty.segment.as_str()), (2, 1, 0, ""));
        assert_eq!((empty.head.as_str(), empty.prev_checkpoint), (first.head.as_str(), first.hash()));
        assert!(!empty.source_reset.is_empty());
    }

    #[test]
    fn the_state_file_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomically(&path, b"{\"a\":1}").expect("writes");
        write_atomically(&path, b"{}").expect("writes");
        assert_eq!(std::fs::read(&path).expect("reads"), b"{}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("lists").count(), 1, "no temporary file left");
        assert!(matches!(load_state(&path), Err(SidecarError::State { .. })));
        assert!(matches!(load_state(&dir.path().join("missing")), Ok(None)));
    }
}
