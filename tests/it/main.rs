//! keyward's integration tests, in one binary (it links the crate and the AWS SDK once):
//! a module per area, shared helpers in `common`.

mod common;

mod agent_keys;
mod audit;
#[cfg(feature = "aws")]
mod aws;
mod binary;
mod budgets;
mod canary;
mod clients;
mod connections;
mod dashboard;
mod delegation;
mod deploy;
mod docs;
mod exec;
mod forward;
mod hostile;
mod lifecycle;
mod limits;
mod minted;
mod ops;
mod parking;
mod proxy;
mod redis;
mod restart;
#[cfg(feature = "aws")]
mod rotation;
mod scrub;
mod sigv4;
mod unix_socket;
mod vault;
