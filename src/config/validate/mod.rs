//! Turns raw config into a validated `Config`, collecting every problem with its field path.
//! One file per section, each a function over the shared `Collector`; `build` calls them in
//! the order the sections depend on each other (routes and sources before the roles that
//! grant them, roles before the agents that hold them).

mod audit;
mod budgets;
mod delegation;
mod hosts;
mod limits;
mod roles;
mod routes;
mod secrets;
mod server;
mod sources;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawConfig;
use super::spans::SpanIndex;
use super::{Config, ConfigErrors, Problem};
use crate::credentials;

struct Collector<'a> {
    file: &'a str,
    index: &'a SpanIndex,
    /// The directory relative paths in this file resolve against: the file's own directory.
    base: &'a Path,
    problems: Vec<Problem>,
}

impl credentials::Report for Collector<'_> {
    fn problem(&mut self, field: String, message: String) {
        Collector::problem(self, field, message);
    }

    fn path(&self, written: &str) -> PathBuf {
        Collector::path(self, written)
    }
}

impl Collector<'_> {
    /// A path as written in the config, made relative to the config file's directory, so a
    /// config behaves the same whatever the working directory.
    fn path(&self, written: &str) -> PathBuf {
        self.base.join(written)
    }

    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        self.problems.push(Problem {
            file: self.file.to_string(),
            line: self.index.line_of(&field),
            field,
            message: message.into(),
        });
    }
}

pub fn validate(value: serde_json::Value, index: &SpanIndex, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    // Structural problems do not stop the check: the repaired raw config is validated too, so
    // one run reports everything, minus what only follows from a repair.
    let mut parsed = super::structural::parse(value, index, file);
    let Some(raw) = parsed.raw.take() else { return Err(ConfigErrors(parsed.problems)) };
    let mut c = Collector { file, index, base, problems: Vec::new() };
    let config = build(raw, &mut c);
    let mut problems = parsed.problems.clone();
    problems.extend(c.problems.into_iter().filter(|p| !parsed.is_consequence(p)));
    // In file order, as a compiler lists them.
    problems.sort_by_key(|p| p.line.unwrap_or(0));
    if problems.is_empty() { Ok(config) } else { Err(ConfigErrors(problems)) }
}

/// `" (did you mean 'x'?)"` when there is a near name, else nothing.
fn did_you_mean(near: Option<&str>) -> String {
    near.map(|n| format!(" (did you mean '{n}'?)")).unwrap_or_default()
}

fn ms(value: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(value.unwrap_or(default_ms))
}

fn build(raw: RawConfig, c: &mut Collector<'_>) -> Config {
    let server = server::server(c, raw.server);
    let forward = server::forward(c, raw.forward);
    let mut audit = audit::audit(c, raw.audit);
    let admin = server::admin(c, raw.admin);
    let (sources, mut secret_owner) =
        sources::sources(c, raw.sources, &raw.sources_from, &raw.notifications, &mut audit);
    // A `[secrets.NAME]` table that failed its checks was reported there, not again at its grants.
    // Those that sign, or whose kind is unknown; minted ones are taken out once they are read.
    let mut declared: HashSet<String> = raw
        .secrets
        .iter()
        .filter(|(_, table)| table.get("kind").is_some_and(|k| k.as_str() != Some(credentials::STATIC)))
        .map(|(name, _)| name.clone())
        .collect();
    let (signing, minting) = secrets::split_signing(c, raw.secrets);
    let sigv4 = credentials::sigv4::configure(c, signing, &mut secret_owner);
    let routes = routes::routes(c, raw.routes);
    let forward_proxy = hosts::forward_proxy(c, raw.forward_proxy, &audit.path);
    if let Some(forward_proxy) = &forward_proxy {
        hosts::tunnels_against_routes(c, forward_proxy, &routes);
    }
    let route_names: HashSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let kinds = secrets::kinds(c, minting, &secret_owner);
    declared.retain(|name| !kinds.contains_key(name));
    let roles = roles::roles(c, raw.roles, &route_names, &secret_owner);
    secrets::grant_scopes(c, &roles, &kinds);
    roles::signing_agrees(c, &roles, &routes, &sigv4, &declared);
    let agents = roles::agents(c, raw.agents, &roles, &server);
    let limits = limits::limits(c, raw.limits);
    let usage = std::sync::Arc::new(budgets::usage(c, raw.usage, &route_names));
    let budgets = budgets::budgets(c, raw.budgets, &agents, &roles, limits.fail_open);
    Config {
        server,
        forward,
        forward_proxy,
        audit,
        admin,
        limits,
        sources,
        kinds,
        routes,
        roles,
        agents,
        usage,
        budgets,
        sigv4,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | ':'))
}

fn check_unique(c: &mut Collector<'_>, items: impl Iterator<Item = (String, String)>, what: &str) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for (field, value) in items {
        if let Some(first) = seen.get(&value) {
            c.problem(field, format!("duplicate {what} '{value}' (first at {first})"));
        } else {
            seen.insert(value, field);
        }
    }
}

/// What the section tests share: config text in, the whole list of problems out.
#[cfg(test)]
mod table {
    /// Every problem the TOML config `text` has, as `k.toml:line: field: message`.
    pub fn problems(text: &str) -> Vec<String> {
        match super::super::load_str(text, "k.toml", false) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// Checks each `(case, config text, expected problems)`, reporting every mismatch at once.
    pub fn check(cases: &[(&str, &str, &[&str])]) {
        let mut failed = Vec::new();
        for (case, text, expected) in cases {
            let got = problems(text);
            if got != *expected {
                failed.push(format!("{case}:\n  expected {expected:#?}\n  got {got:?}"));
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}
