//! The audit trail: one JSON line per attempt, on every outcome.

pub mod access_log;
mod body;
pub mod chain;
pub mod event;
mod guard;
pub mod read;
mod record;
pub mod report;
mod sink;

pub use body::AuditedBody;
pub use event::AuditEvent;
pub use guard::{AuditGuard, BodyEnd, Settle, Settled, new_request_id};
pub use record::{AuditRecord, Decision, Outcome, UsageRecord, WouldDeny};
pub use sink::{AuditSink, WriteFailed, chain_files};
