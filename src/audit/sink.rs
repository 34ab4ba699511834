//! The JSONL audit file: one writer thread fed by a bounded channel, so the request path never
//! takes a lock, and concurrent records are written in batches with one `write(2)` each.
//!
//! A full channel blocks the sender briefly instead of dropping a record. A failed write is
//! logged and counted, never silent.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::metrics::Metrics;

const CHANNEL_CAPACITY: usize = 16 * 1024;
const MAX_BATCH: usize = 512;

enum Message {
    Line(Vec<u8>),
    Flush(std::sync::mpsc::Sender<()>),
}

pub struct AuditSink {
    tx: SyncSender<Message>,
    path: PathBuf,
}

impl AuditSink {
    /// Opens (creating directories as needed) the audit file for appending and starts the writer.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> std::io::Result<AuditSink> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let display = path.display().to_string();
        std::thread::Builder::new()
            .name("keyward-audit".to_string())
            .spawn(move || writer(file, rx, metrics, display))?;
        Ok(AuditSink { tx, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one finished JSON line (ending in a newline).
    pub fn emit(&self, line: Vec<u8>, request_id: &str) {
        if self.tx.send(Message::Line(line)).is_err() {
            tracing::error!(request_id, "audit writer has stopped; record not written");
        }
    }

    /// Returns once every record emitted before this call has been handed to the OS.
    pub fn flush(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        if self.tx.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }
}

fn writer(mut file: File, rx: Receiver<Message>, metrics: Arc<Metrics>, path: String) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut waiting: Vec<std::sync::mpsc::Sender<()>> = Vec::new();
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut lines = 0u64;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Message::Flush(done) => waiting.push(done),
            }
            if lines as usize >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            match file.write_all(&batch) {
                Ok(()) => {
                    metrics.audit_records.inc_by(lines);
                    if failing {
                        tracing::warn!(path, "audit file is writable again");
                        failing = false;
                    }
                }
                Err(error) => {
                    metrics.audit_write_errors.inc_by(lines);
                    tracing::error!(path, %error, records = lines, "audit records could not be written");
                    failing = true;
                }
            }
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
