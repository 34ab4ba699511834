//! The audit file writer. Records arrive as canonical JSON lines built on the request's thread;
//! sealing them into the hash chain and appending them happens under one lock, in chain order.
//!
//! With `durability = "os"` (or `"none"`) on a regular file, a request writes its own
//! `request.released` record: it seals it, and with the same `write(2)` also appends any outcome
//! records queued since the last write; no thread hand-off, no wake-up. Outcome records are only
//! queued (sealed, in memory) and reach the file with the next write, or within `POLL` from the
//! writer thread. `fsync` mode, files that are not regular (a FIFO, a device), a lock held too
//! long, and the 5 s after a write on a request's thread was slow (a stalling disk) go through the
//! writer thread instead: a bounded channel, batches,
//! one `write(2)` (and in `fsync` mode one fsync) per batch, then acknowledgements. The writer
//! thread also rotates the file daily or by size, prunes files past retention, and the chain
//! resumes after a restart.
//!
//! A full channel slows the sender (asynchronously, or on a blocking thread) instead of dropping a
//! record or stalling the async workers. A failed write is logged and counted, and reported to
//! the requests waiting on it, so they can fail closed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::oneshot;

use super::chain::{ChainHead, Line};
use super::event::AuditEvent;
use crate::config::{AuditConfig, Durability, OnFailure};
use crate::metrics::Metrics;
use crate::timestamp;

const CHANNEL_CAPACITY: usize = 16 * 1024;
const MAX_BATCH: usize = 512;
const TICK: Duration = Duration::from_secs(1);
/// While records are queued, the writer thread writes them out this often.
const POLL: Duration = Duration::from_millis(5);
/// Polls without anything queued before the writer thread goes back to sleeping a `TICK`.
const IDLE_POLLS: u32 = 200;
/// `durability = "none"`: queued bytes that make the next record write them out at once.
const QUEUE_LIMIT: usize = 256 * 1024;
/// How often a request tries the writer's lock before handing its record to the writer thread.
const LOCK_ATTEMPTS: u32 = 64;
/// A write on a request's thread that took this long sends every record through the writer
/// thread for `SLOW_BACKOFF`.
const SLOW_WRITE: Duration = Duration::from_millis(20);
const SLOW_BACKOFF: Duration = Duration::from_secs(5);

/// The audit file could not be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailed(pub String);

type Ack = oneshot::Sender<Result<(), WriteFailed>>;

enum Message {
    Record {
        line: Line,
        ack: Option<Ack>,
    },
    Flush(std::sync::mpsc::Sender<()>),
    /// Records were queued while the writer thread slept: poll again.
    Wake,
}

pub struct AuditSink {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
    path: PathBuf,
    durability: Durability,
    on_failure: OnFailure,
    /// When shutdown's grace period ends: a response still open then is cut by keyward.
    closing_at: std::sync::OnceLock<Instant>,
}

struct Shared {
    writer: Mutex<Writer>,
    /// Requests may write under the lock themselves (a regular file, not `fsync` mode).
    direct: bool,
    /// The writer thread is polling the queue, so queuing a record needs no wake-up.
    polling: AtomicBool,
    /// Until when (ms since `started`) requests leave writing to the writer thread, after a
    /// write on a request's thread was slow: a stalling disk then blocks the writer thread, not
    /// the async workers.
    slow_until_ms: AtomicU64,
    started: Instant,
}

impl Shared {
    /// Whether a request may write its record itself now.
    fn writes_directly(&self) -> bool {
        // No clock read unless a slow write ever happened.
        let slow_until = self.slow_until_ms.load(Ordering::Relaxed);
        self.direct && (slow_until == 0 || self.elapsed_ms() >= slow_until)
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Writes what is queued on a request's thread, and steps aside for a while if that was slow.
    fn write_here(&self, writer: &mut Writer) -> Result<(), WriteFailed> {
        let started = Instant::now();
        let result = writer.write_queued();
        let took = started.elapsed();
        if took >= SLOW_WRITE {
            self.slow_until_ms.store(self.elapsed_ms() + SLOW_BACKOFF.as_millis() as u64, Ordering::Relaxed);
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                "an audit write was slow; the audit thread writes alone for a while"
            );
        }
        result
    }

    /// The writer, if it can be had at once: a request never waits behind a stalling write.
    fn try_lock(&self) -> Option<MutexGuard<'_, Writer>> {
        for _ in 0..LOCK_ATTEMPTS {
            match self.writer.try_lock() {
                Ok(writer) => return Some(writer),
                Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => std::hint::spin_loop(),
            }
        }
        None
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl AuditSink {
    /// Opens (creating directories as needed) the audit file, resumes its chain, and starts the
    /// writer thread.
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> std::io::Result<AuditSink> {
        Self::open_with_capacity(config, metrics, CHANNEL_CAPACITY)
    }

    fn open_with_capacity(config: &AuditConfig, metrics: Arc<Metrics>, capacity: usize) -> std::io::Result<AuditSink> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let head = resume_head(&path);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if config.durability == Durability::None {
            tracing::warn!(
                "audit.durability = \"none\": records are buffered in memory and lost on a crash; use only for benchmarks"
            );
        }
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        let mut writer = Writer {
            len: file.metadata().ok().filter(|m| m.is_file()).map(|m| m.len()),
            file,
            path: path.clone(),
            head,
            queued: Queued::default(),
            durability: config.durability,
            rotate_bytes: config.rotate_bytes,
            rotate_daily: config.rotate_daily,
            retention_days: config.retention_days,
            date: today(),
            metrics,
            failing: false,
            torn: false,
        };
        writer.start_line_clean();
        writer.prune();
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            direct: regular && config.durability != Durability::Fsync,
            polling: AtomicBool::new(false),
            slow_until_ms: AtomicU64::new(0),
            started: Instant::now(),
        });
        let (tx, rx) = sync_channel(capacity);
        let thread_shared = shared.clone();
        std::thread::Builder::new().name("keyward-audit".to_string()).spawn(move || run(&thread_shared, rx))?;
        Ok(AuditSink {
            tx,
            shared,
            path,
            durability: config.durability,
            on_failure: config.on_failure,
            closing_at: std::sync::OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// Queues a record; it is written with the next write. Never blocks an async worker: if
    /// the writer is busy and the channel is full (the disk is stalling), a blocking thread waits
    /// to hand it over, so no record is dropped and the proxy keeps running.
    pub fn record(&self, line: impl Into<Line>) {
        let line = line.into();
        if self.shared.writes_directly()
            && let Some(mut writer) = self.shared.try_lock()
        {
            writer.queue(&line);
            if writer.queued.bytes.len() >= QUEUE_LIMIT {
                let _ = self.shared.write_here(&mut writer);
            }
            drop(writer);
            self.wake_writer();
            return;
        }
        let message = match self.tx.try_send(Message::Record { line, ack: None }) {
            Ok(()) => return,
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("audit writer has stopped; record not written");
                return;
            }
            Err(TrySendError::Full(message)) => message,
        };
        let tx = self.tx.clone();
        let send = move || {
            if tx.send(message).is_err() {
                tracing::error!("audit writer has stopped; record not written");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(send)),
            Err(_) => send(),
        }
    }

    /// Records were queued: unless the writer thread is already polling, wake it, so they reach
    /// the file within `POLL` even if no other request writes.
    fn wake_writer(&self) {
        // Checked after queuing: the writer stops polling only after a last look at the queue.
        if !self.shared.polling.load(Ordering::SeqCst) && !self.shared.polling.swap(true, Ordering::SeqCst) {
            let _ = self.tx.try_send(Message::Wake);
        }
    }

    /// Writes a record and returns once it has been written (handed to the OS, and fsync'd in
    /// `fsync` mode). With `durability = "none"` it only queues it.
    pub async fn record_durably(&self, line: impl Into<Line>) -> Result<(), WriteFailed> {
        let line = line.into();
        if self.durability == Durability::None {
            self.record(line);
            return Ok(());
        }
        if self.shared.writes_directly()
            && let Some(mut writer) = self.shared.try_lock()
        {
            writer.queue(&line);
            let result = self.shared.write_here(&mut writer);
            let rotate = writer.rotation_due();
            drop(writer);
            if rotate {
                // Rotation renames and prunes files: the writer thread's work, not a request's.
                let _ = self.tx.try_send(Message::Wake);
            }
            return result;
        }
        let (ack, done) = oneshot::channel();
        let stopped = || WriteFailed("the audit writer has stopped".to_string());
        let mut message = Message::Record { line, ack: Some(ack) };
        // A full queue (a stalling disk) makes this request wait, asynchronously, not a worker.
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    message = back;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return Err(stopped()),
            }
        }
        done.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Returns once every record queued before this call has been handed to the OS.
    /// Shutdown began: from `at`, the end of its grace period, connections still open are
    /// closed by keyward. Set before the listeners learn of the shutdown, so their own grace
    /// period never ends before `at`.
    pub fn closing_from(&self, at: Instant) {
        let _ = self.closing_at.set(at);
    }

    /// Whether a response ending now was cut by keyward's shutdown.
    pub fn is_closing(&self) -> bool {
        self.closing_at.get().is_some_and(|at| Instant::now() >= *at)
    }

    pub fn flush(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if self.tx.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }
}

/// The writer thread: writes what the channel brings and what requests queued, rotates, prunes.
fn run(shared: &Shared, rx: Receiver<Message>) {
    let mut idle_polls = 0;
    loop {
        let polling = shared.polling.load(Ordering::SeqCst);
        let first = match rx.recv_timeout(if polling { POLL } else { TICK }) {
            Ok(message) => Some(message),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut records = Vec::new();
        let mut flushes = Vec::new();
        let mut next = first;
        while let Some(message) = next.take() {
            match message {
                Message::Record { line, ack } => records.push((line, ack)),
                Message::Flush(done) => flushes.push(done),
                Message::Wake => {}
            }
            if records.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        let mut writer = shared.lock();
        let busy = !records.is_empty() || !writer.queued.bytes.is_empty();
        let mut acks = Vec::new();
        for (line, ack) in records {
            writer.queue(&line);
            acks.extend(ack);
        }
        let outcome = writer.write_queued();
        for ack in acks {
            let _ = ack.send(outcome.clone());
        }
        // Rotation (and the pruning it triggers) happens before a flush is acknowledged, so
        // a caller that flushed sees the files as they will stay.
        let size = writer.len;
        writer.rotate_if_due(size);
        drop(writer);
        for done in flushes {
            let _ = done.send(());
        }
        idle_polls = if busy { 0 } else { idle_polls + 1 };
        if polling && idle_polls >= IDLE_POLLS {
            shared.polling.store(false, Ordering::SeqCst);
            // A record queued before this store was seen by no wake-up: write it now.
            let _ = shared.lock().write_queued();
        }
    }
    let _ = shared.lock().write_queued();
}

/// Sealed lines not yet written, and the chain head before the first of them (restored if the
/// write fails: unwritten records never join the chain).
#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    head_before: Option<ChainHead>,
    count: u64,
}

struct Writer {
    file: File,
    /// The file's length when it is a regular file, kept here: a `stat` per write would cost a
    /// syscall and make the kernel keep fine-grained timestamps (an inode update per write).
    len: Option<u64>,
    path: PathBuf,
    head: ChainHead,
    queued: Queued,
    durability: Durability,
    rotate_bytes: u64,
    rotate_daily: bool,
    retention_days: u32,
    date: String,
    metrics: Arc<Metrics>,
    failing: bool,
    /// A failed write left a fragment that could not be cut off.
    torn: bool,
}

fn today() -> String {
    timestamp::date(SystemTime::now())
}

fn now() -> String {
    timestamp::now_millis()
}

impl Writer {
    /// Seals `line` into the chain and queues it behind the lines already queued.
    fn queue(&mut self, line: &Line) {
        if self.queued.head_before.is_none() {
            self.queued.head_before = Some(self.head.clone());
        }
        self.head.seal_into(line, &mut self.queued.bytes);
        self.queued.bytes.push(b'\n');
        self.queued.count += 1;
    }

    /// Writes every queued line with one `write(2)` (and an fsync in `fsync` mode).
    fn write_queued(&mut self) -> Result<(), WriteFailed> {
        let Some(head_before) = self.queued.head_before.take() else { return Ok(()) };
        let bytes = std::mem::take(&mut self.queued.bytes);
        let count = std::mem::take(&mut self.queued.count);
        let length_before = self.len;
        let mut bytes = bytes;
        if self.torn {
            bytes.insert(0, b'\n');
        }
        let result = self.write(&bytes);
        if result.is_ok() {
            self.torn = false;
        }
        match &result {
            Ok(()) => {
                self.metrics.audit_records.inc_by(count);
                if self.failing {
                    tracing::warn!(path = %self.path.display(), "audit file is writable again");
                    self.failing = false;
                }
            }
            Err(error) => {
                // Unwritten records never joined the chain: cut off whatever part of the batch
                // reached the file (a torn line, or lines an fsync could not make durable), so
                // the next batch links to the last record that is really there.
                if let Some(length) = length_before
                    && let Err(cut) = self.file.set_len(length)
                {
                    tracing::error!(error = %cut, "a failed audit batch could not be cut off; verify will report it");
                    // The torn fragment stays on its own line: the next record starts a new one.
                    self.torn = true;
                }
                self.head = head_before;
                self.metrics.audit_write_errors.inc_by(count);
                if !self.failing {
                    tracing::error!(path = %self.path.display(), %error, "audit records cannot be written");
                    self.failing = true;
                }
            }
        }
        let length_after = length_before.map(|n| if result.is_ok() { n + bytes.len() as u64 } else { n });
        self.len = length_after;
        // Keep the allocation for the next lines, unless one burst made it large.
        if bytes.capacity() <= QUEUE_LIMIT {
            let mut bytes = bytes;
            bytes.clear();
            self.queued.bytes = bytes;
        }
        result.map_err(|e| WriteFailed(e.to_string()))
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        if self.durability == Durability::Fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Writes one record the writer produces itself (rotation and pruning events).
    fn write_event(&mut self, event: AuditEvent) {
        self.queue(&Line::from_value(event.record_now()));
        let _ = self.write_queued();
    }

    /// If the file does not end with a newline (a torn write before a power loss), start the
    /// next record on a fresh line, so the torn fragment stays an isolated, reportable line.
    fn start_line_clean(&mut self) {
        // Only regular files are read back: opening a FIFO or a device for reading could block.
        if !std::fs::metadata(&self.path).is_ok_and(|m| m.is_file()) {
            return;
        }
        let Ok(mut file) = File::open(&self.path) else { return };
        if !file.metadata().is_ok_and(|m| m.is_file() && m.len() > 0) {
            return;
        }
        let mut last = [0u8; 1];
        if file.seek(SeekFrom::End(-1)).is_ok()
            && file.read_exact(&mut last).is_ok()
            && last[0] != b'\n'
            && self.file.write_all(b"\n").is_ok()
        {
            self.len = self.len.map(|n| n + 1);
        }
    }

    /// Whether the file has reached `rotate_bytes`.
    fn rotation_due(&self) -> bool {
        self.len.is_some_and(|n| self.rotate_bytes > 0 && n >= self.rotate_bytes)
    }

    /// `size`: the file's length if it is a regular file (only those rotate).
    fn rotate_if_due(&mut self, size: Option<u64>) {
        let Some(size) = size else { return };
        let new_day = self.rotate_daily && today() != self.date;
        let too_big = self.rotate_bytes > 0 && size >= self.rotate_bytes;
        if size > 0 && (new_day || too_big) {
            self.rotate();
            self.prune();
        }
        self.date = today();
    }

    fn rotate(&mut self) {
        if let Err(error) = self.write_queued() {
            tracing::error!(error = %error.0, "queued audit records could not be written before rotation");
        }
        let mut rotated = rotated_name(&self.path, &now());
        while rotated.exists() {
            // Two rotations within one millisecond: never overwrite a rotated file.
            std::thread::sleep(Duration::from_millis(2));
            rotated = rotated_name(&self.path, &now());
        }
        if let Err(error) = std::fs::rename(&self.path, &rotated) {
            tracing::error!(%error, "audit file could not be rotated");
            return;
        }
        match OpenOptions::new().create(true).append(true).open(&self.path) {
            Ok(file) => {
                self.len = file.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
                self.file = file;
                tracing::info!(rotated = %rotated.display(), "audit file rotated; the chain continues in the new file");
            }
            Err(error) => tracing::error!(%error, "a new audit file could not be opened after rotation"),
        }
    }

    /// Deletes rotated files older than `retention_days`, and records the deletion in the chain
    /// with the hash of the first record that survives.
    fn prune(&mut self) {
        let cutoff = SystemTime::now() - Duration::from_secs(u64::from(self.retention_days) * 86_400);
        let cutoff = stamp(&timestamp::millis(cutoff));
        let files = chain_files(&self.path);
        let mut deleted = Vec::new();
        for file in files.iter().filter(|f| **f != self.path) {
            let Some(file_stamp) = file_stamp(&self.path, file) else { continue };
            if file_stamp < cutoff {
                match std::fs::remove_file(file) {
                    Ok(()) => deleted.push(file.file_name().unwrap_or_default().to_string_lossy().into_owned()),
                    Err(error) => {
                        tracing::error!(file = %file.display(), %error, "expired audit file could not be deleted")
                    }
                }
            }
        }
        if deleted.is_empty() {
            return;
        }
        let first_surviving = chain_files(&self.path).into_iter().find_map(|f| first_hash(&f));
        tracing::info!(files = deleted.len(), "expired audit files deleted");
        self.write_event(AuditEvent::AuditPruned {
            deleted,
            retention_days: self.retention_days,
            first_surviving_hash: first_surviving,
        });
    }
}

/// `keyward-audit.jsonl` + `2026-11-23T22:05:00.123Z` → `keyward-audit.20261123T220500123Z.jsonl`.
fn rotated_name(active: &Path, rfc3339: &str) -> PathBuf {
    let stem = active.file_stem().unwrap_or_default().to_string_lossy();
    let ext = active.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    active.with_file_name(format!("{stem}.{}{ext}", stamp(rfc3339)))
}

fn stamp(rfc3339_millis: &str) -> String {
    rfc3339_millis.replace(['-', ':', '.'], "")
}

fn file_stamp(active: &Path, file: &Path) -> Option<String> {
    let stem = active.file_stem()?.to_string_lossy().into_owned();
    let name = file.file_name()?.to_string_lossy().into_owned();
    let rest = name.strip_prefix(&format!("{stem}."))?;
    let stamp = rest.split('.').next()?;
    (stamp.len() == 19 && stamp.ends_with('Z') && stamp.as_bytes()[8] == b'T').then(|| stamp.to_string())
}

/// The files of one chain in order: rotated files oldest first, then the active file.
pub fn chain_files(active: &Path) -> Vec<PathBuf> {
    let dir = active.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut rotated: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| file_stamp(active, &p).map(|s| (s, p)))
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if active.exists() {
        files.push(active.to_path_buf());
    }
    files
}

fn first_hash(file: &Path) -> Option<String> {
    use std::io::BufRead;
    let line = std::io::BufReader::new(File::open(file).ok()?).lines().next()?.ok()?;
    let value: Value = serde_json::from_str(&line).ok()?;
    value.get("hash")?.as_str().map(str::to_string)
}

/// The chain head after the newest record on disk, or genesis for a new trail.
fn resume_head(active: &Path) -> ChainHead {
    for file in chain_files(active).iter().rev() {
        // Only regular files are read back: opening a FIFO or a device for reading could block.
        if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(mut f) = File::open(file) else { continue };
        let Ok(meta) = f.metadata() else { continue };
        if !meta.is_file() || meta.len() == 0 {
            continue;
        }
        let start = meta.len().saturating_sub(256 * 1024);
        let mut tail = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut tail).is_err() {
            continue;
        }
        let text = String::from_utf8_lossy(&tail);
        if let Some(head) = text.lines().rev().find_map(ChainHead::after) {
            return head;
        }
    }
    ChainHead::genesis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::Verifier;
    use serde_json::json;

    fn config(path: &Path) -> AuditConfig {
        AuditConfig {
            path: path.to_path_buf(),
            retention_days: 90,
            metadata: Default::default(),
            durability: Durability::Os,
            on_failure: OnFailure::Deny,
            rotate_bytes: 0,
            rotate_daily: true,
        }
    }

    fn verify(active: &Path) -> Result<u64, String> {
        let mut v = Verifier::new();
        for file in chain_files(active) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (i, line) in text.lines().enumerate() {
                v.check_line(&file.display().to_string(), i + 1, line).map_err(|b| b.to_string())?;
            }
        }
        v.finish().map_err(|b| b.to_string())?;
        Ok(v.records)
    }

    #[tokio::test]
    async fn records_are_chained_and_the_chain_resumes_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        for round in 0..2 {
            let sink = AuditSink::open(&config(&path), Arc::new(Metrics::new())).unwrap();
            sink.record_durably(json!({ "type": "request.released", "round": round })).await.unwrap();
            sink.record(json!({ "type": "request", "round": round }));
            sink.flush();
        }
        assert_eq!(verify(&path), Ok(4));
        let last = std::fs::read_to_string(&path).unwrap().lines().last().unwrap().to_string();
        assert_eq!(ChainHead::after(&last).unwrap().seq, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_direct_writes_and_queued_outcomes_form_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = Arc::new(AuditSink::open(&config(&path), Arc::new(Metrics::new())).unwrap());
        assert!(sink.shared.direct, "a regular file in os mode is written directly");
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let sink = sink.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        sink.record_durably(json!({ "type": "request.released", "t": t, "i": i })).await.unwrap();
                        sink.record(json!({ "type": "request", "t": t, "i": i }));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        sink.flush();
        assert_eq!(verify(&path), Ok(1600));
    }

    #[tokio::test]
    async fn a_queued_outcome_reaches_the_file_without_another_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::open(&config(&path), Arc::new(Metrics::new())).unwrap();
        sink.record(json!({ "type": "request", "n": 1 }));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 1 {
            assert!(std::time::Instant::now() < deadline, "the outcome record stayed queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(verify(&path), Ok(1));
    }

    #[tokio::test]
    async fn rotation_by_size_continues_the_chain_and_pruning_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut cfg = config(&path);
        cfg.rotate_bytes = 300;
        let sink = AuditSink::open(&cfg, Arc::new(Metrics::new())).unwrap();
        for i in 0..6 {
            sink.record_durably(json!({ "type": "request", "i": i, "pad": "x".repeat(200) })).await.unwrap();
            // Rotation is the audit thread's work; a flush waits for its pass.
            sink.flush();
        }
        sink.flush();
        drop(sink);
        let files = chain_files(&path);
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(verify(&path), Ok(6));

        // Age the oldest rotated file past retention, reopen: it is deleted and the chain says so.
        let oldest = files[0].clone();
        std::fs::rename(&oldest, rotated_name(&path, "2001-01-01T00:00:00.000Z")).unwrap();
        let sink = AuditSink::open(&cfg, Arc::new(Metrics::new())).unwrap();
        sink.flush();
        drop(sink);
        let text: String = chain_files(&path).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
        assert!(text.contains("\"type\":\"audit.pruned\""), "{text}");
        assert!(verify(&path).is_ok(), "{:?}", verify(&path));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_disk_never_blocks_async_workers_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        // A reader that does not read yet: once the pipe buffer fills, every write(2) blocks,
        // exactly like a disk that has stalled.
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || File::open(reader_path).unwrap());
        let sink = Arc::new(AuditSink::open_with_capacity(&config(&fifo), Arc::new(Metrics::new()), 4).unwrap());
        let mut reader = reader.join().unwrap();
        let n = 800;
        let started = std::time::Instant::now();
        let writer = sink.clone();
        tokio::spawn(async move {
            for i in 0..n {
                writer.record(json!({ "type": "request", "i": i, "pad": "x".repeat(300) }));
            }
        })
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "record() blocked an async worker: {:?}",
            started.elapsed()
        );
        // Once the disk moves again, every record arrives.
        let drained = std::thread::spawn(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            text
        });
        let flusher = sink.clone();
        tokio::task::spawn_blocking(move || flusher.flush()).await.unwrap();
        drop(sink);
        // The writer thread ends once every sender (including the blocking hand-offs) is gone.
        let text = tokio::task::spawn_blocking(move || drained.join().unwrap()).await.unwrap();
        assert_eq!(text.lines().count(), n, "records were lost");
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_waiting_request_and_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let sink = AuditSink::open(&config(Path::new("/dev/full")), metrics.clone()).unwrap();
        let result = sink.record_durably(json!({ "type": "request.released" })).await;
        assert!(result.is_err());
        assert_eq!(metrics.audit_write_errors.get(), 1);
    }
}
