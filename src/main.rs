//! The keyward binary: parse the command line, set up logging, load config, run the command.
// `deny`, not `forbid`: `return_freed_memory` makes the one allocator call that needs `unsafe`.
#![deny(unsafe_code)]

use std::cell::Cell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use keyward::config::{self, Config};
use keyward::identity;

/// mimalloc rather than glibc's malloc: the proxy allocates many small, short-lived objects, and
/// audit records are built on the async workers but freed on the audit writer's thread, which with
/// glibc contends on the workers' arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run by each async worker as it runs out of work (at most every 100 ms per worker): hands
/// the pages freed on this thread back to the OS. mimalloc frees and purges a thread's empty
/// pages only while that thread keeps allocating, so a worker that goes quiet after a burst (for
/// example after parking thousands of idle connections) would keep that memory resident: with
/// 10,000 parked connections `loadtest/idle-rss.sh` measured 183 MiB RSS without this and 48 MiB
/// with it. One call costs tens of microseconds (walking this thread's pages, purging the empty
/// ones), and a worker only parks when it has nothing to run; at most ten a second keeps that off the
/// latency of busy workers, which free their pages as they allocate anyway.
#[allow(unsafe_code)]
fn return_freed_memory() {
    thread_local! { static LAST: Cell<Option<Instant>> = const { Cell::new(None) }; }
    let now = Instant::now();
    if LAST.get().is_some_and(|last| now.duration_since(last) < Duration::from_millis(100)) {
        return;
    }
    // SAFETY: mi_collect has no preconditions; it only walks and releases the calling thread's
    // own free pages.
    unsafe { libmimalloc_sys::mi_collect(false) };
    LAST.set(Some(now));
}

#[derive(Parser)]
#[command(name = "keyward", version, about = "A credential-injecting reverse proxy for AI agents")]
struct Cli {
    /// Log filter, e.g. `info` or `keyward=debug,warn`. RUST_LOG is used when this is not set.
    #[arg(long, global = true, env = "KEYWARD_LOG")]
    log: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. Without --config: config/keyward.toml, else the embedded default (which
    /// keeps its files in $KEYWARD_STATE_DIR, default ~/.local/state/keyward).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Serve agents on this TCP address instead of the config's `server.listen`
        /// (port 0 picks a free port; the chosen one is logged).
        #[arg(long, env = "KEYWARD_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Serve /healthz, /readyz, /metrics and the admin API here instead of `server.admin_listen`.
        #[arg(long, env = "KEYWARD_ADMIN_LISTEN")]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Validate a config without serving; prints every problem as file:line: field: message.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if a running keyward is ready (its admin /readyz answers 200), 1 if not: for
    /// container health checks.
    Health {
        /// The config whose `server.admin_listen` to ask (default resolution as for `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask this URL instead, e.g. http://127.0.0.1:9090/readyz.
        #[arg(long, env = "KEYWARD_HEALTH_URL")]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Manage agent identities.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Start a fake upstream and a proxy, send one agent request, and show what each side saw.
    Demo,
    /// Check or summarise the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage the admin API.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The forward proxy's CA (the certificate agents trust to be intercepted).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the environment an agent needs to use the forward proxy (HTTPS_PROXY, NO_PROXY and
    /// the CA bundle variables), one NAME=value per line, for `docker --env-file` or `export`.
    AgentEnv {
        /// The agent id (an [[agents]] entry).
        #[arg(long)]
        agent: String,
        /// Put the agent's real key into HTTPS_PROXY: it is read from $KEYWARD_AGENT_KEY (never
        /// from the command line, which other processes can see) and checked against the config.
        /// Without it, the key is the placeholder `<agent-key>`.
        #[arg(long)]
        with_key: bool,
        /// The host agents reach the forward proxy at (default: forward_proxy.listen's address;
        /// needed when it listens on 0.0.0.0, e.g. `keyward` in a compose network).
        #[arg(long)]
        proxy_host: Option<String>,
        /// Where the agent finds the CA certificate (default: forward_proxy.ca_cert_file), e.g. a
        /// path mounted into its container.
        #[arg(long)]
        ca_path: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM). Generates the CA first if it does not exist yet, as
    /// `serve` would.
    Export {
        /// Print the system's trusted roots first, then keyward's CA: a bundle for
        /// SSL_CERT_FILE that also verifies hosts that are not intercepted (tunnel_hosts, NO_PROXY).
        #[arg(long)]
        bundle: bool,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain. Exits 0 on an intact trail; otherwise prints the first broken place
    /// (file, line, seq) and exits 1.
    Verify {
        /// Audit files or directories; default: the config's audit.path and its rotated files.
        paths: Vec<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// A compliance report: use per credential and agent, denials, throttles, anomalies, rotations.
    Report {
        /// How far back: a duration (7d, 12h) or an RFC 3339 time.
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Audit files or directories; default: the config's audit.path and its rotated files.
        paths: Vec<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
    Html,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin API token. It is printed once; only its SHA-256 goes into the config.
    Token,
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Create a fresh agent key. It is printed once; only its SHA-256 goes into the config.
    New {
        /// The agent id, e.g. subagent-abc123.
        #[arg(long)]
        id: String,
        /// The role the agent gets (a [roles.NAME] table in the config).
        #[arg(long)]
        role: String,
        /// Check that the role exists in this config first.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logging(filter: Option<&str>, format: LogFormat) {
    let filter = filter
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("keyward=info,warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(explicit: Option<&std::path::Path>) -> Result<(Config, String), ExitCode> {
    config::load_for_command(explicit).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("keyward: the config has {} problem(s)", errors.0.len());
        ExitCode::from(2)
    })
}

/// Checks that each minted secret's stored value suits its kind (a PEM that parses, a
/// service-account key); a source that cannot be read now is reported and skipped.
fn check_roots(config: &Config, name: &str) -> Result<(), ExitCode> {
    use keyward::credentials::kind::{RootCheck, check_roots};
    if config.kinds.is_empty() {
        return Ok(());
    }
    let mut found = Vec::new();
    let code = run_async(async {
        found = check_roots(&config.sources, &config.kinds).await;
        Ok(())
    });
    if code != ExitCode::SUCCESS {
        return Err(code);
    }
    let mut invalid = 0;
    for (secret, check) in found {
        match check {
            RootCheck::Usable => {}
            RootCheck::Invalid(why) => {
                invalid += 1;
                eprintln!("{name}: secrets.{secret}: {why}");
            }
            RootCheck::Unchecked(why) => println!("warning: secrets.{secret}: its value was not checked: {why}"),
        }
    }
    if invalid > 0 {
        eprintln!("keyward: the config has {invalid} problem(s)");
        return Err(ExitCode::from(2));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref(), cli.log_format);
    match cli.command {
        Command::Check { config } => match load(config.as_deref()) {
            Ok((config, name)) => {
                if let Err(code) = check_roots(&config, &name) {
                    return code;
                }
                println!(
                    "{name}: OK ({} sources, {} routes, {} roles, {} agents)",
                    config.sources.len(),
                    config.routes.len(),
                    config.roles.len(),
                    config.agents.len()
                );
                for line in keyward::credentials::sigv4::summaries(&config.sigv4, &config.sources) {
                    println!("  {line}");
                }
                for source in config.sources.iter() {
                    if let Some(policy) = source.rotation.as_ref().filter(|p| p.enabled) {
                        let when = policy
                            .schedule
                            .as_ref()
                            .map_or("manual only".to_string(), |s| format!("schedule '{}' (UTC)", s.text));
                        println!(
                            "  source '{}': rotation {when}, grace {} min",
                            source.name,
                            policy.grace_period.as_secs() / 60
                        );
                    }
                }
                for (secret, kind) in &config.kinds {
                    println!("  secret '{secret}': kind {}", kind.kind());
                }
                if let Some(forward) = &config.forward_proxy {
                    let hosts: usize = config.routes.iter().map(|r| r.hosts.len()).sum();
                    println!(
                        "  forward proxy on {}: {hosts} intercepted host(s), {} tunnel host(s), CA {}",
                        forward.listen,
                        forward.tunnel_hosts.len(),
                        forward.ca_cert_file.display()
                    );
                }
                for warning in config.warnings() {
                    println!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Health { config, url, timeout_ms } => {
            let url = match url {
                Some(url) => url,
                None => match load(config.as_deref()) {
                    Ok((config, _)) => keyward::health::readyz_url(config.server.admin_listen),
                    Err(code) => return code,
                },
            };
            let timeout = std::time::Duration::from_millis(timeout_ms);
            run_async(async move {
                let body =
                    keyward::health::check(&url, timeout).await.map_err(|e| anyhow::anyhow!("not ready: {e}"))?;
                println!("{body}");
                Ok(())
            })
        }
        Command::Agents { command: AgentsCommand::New { id, role, config } } => {
            agents_new(&id, &role, config.as_deref())
        }
        Command::Serve { config, listen, admin_listen } => {
            let (mut config, name) = match load(config.as_deref()) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            if name.starts_with('<') {
                let home = config::embedded_home().map(|h| h.display().to_string()).unwrap_or_default();
                tracing::warn!(
                    state_dir = %home,
                    "{} not found; using the embedded default config (its demo secrets, audit trail and state live in state_dir)",
                    config::DEFAULT_CONFIG_PATH
                );
            }
            if let Some(listen) = listen {
                config.server.listen = Some(listen);
            }
            if let Some(admin_listen) = admin_listen {
                config.server.admin_listen = admin_listen;
            }
            tracing::info!(config = %name, "config loaded");
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            let path = (!name.starts_with('<')).then(|| std::path::PathBuf::from(&name));
            run_async(serve(config, path))
        }
        Command::Audit { command: AuditCommand::Verify { paths, config } } => audit_verify(paths, config.as_deref()),
        Command::Audit { command: AuditCommand::Report { since, format, paths, config } } => {
            audit_report(&since, format, paths, config.as_deref())
        }
        Command::Admin { command: AdminCommand::Token } => {
            let token = format!("kwadm_{}", &identity::generate_key()[3..]);
            println!("admin token (shown once; send it as 'Authorization: Bearer <token>'):");
            println!();
            println!("  {token}");
            println!();
            println!("add this to the config:");
            println!();
            println!("[admin]");
            println!("token_sha256 = \"{}\"", hex::encode(identity::hash_key(&token)));
            ExitCode::SUCCESS
        }
        Command::Ca { command: CaCommand::Export { bundle, config } } => ca_export(bundle, config.as_deref()),
        Command::AgentEnv { agent, with_key, proxy_host, ca_path, config } => {
            agent_env(&agent, with_key, proxy_host.as_deref(), ca_path.as_deref(), config.as_deref())
        }
        Command::Demo => run_async(async {
            let text = keyward::demo::run().await?;
            print!("{text}");
            Ok(())
        }),
    }
}

fn run_async(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    // `executor`, not `runtime`: in keyward, `Runtime` is the snapshot of a loaded config.
    let executor =
        match tokio::runtime::Builder::new_multi_thread().enable_all().on_thread_park(return_freed_memory).build() {
            Ok(executor) => executor,
            Err(error) => {
                eprintln!("keyward: cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
    match executor.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keyward: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let running = keyward::instance::start(config).await?;
    if let Some(path) = path {
        let _ = running.state.config_path.set(path);
    }
    // SIGHUP re-reads the config; a bad file is refused and the running config stays.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => {
                let state = running.state.clone();
                match tokio::task::spawn_blocking(move || keyward::reload::reload(&state)).await {
                    Ok(Err(keyward::reload::ReloadError::NoFile)) => {
                        tracing::warn!("{}", keyward::reload::ReloadError::NoFile)
                    }
                    Ok(_) => {}
                    Err(_) => tracing::error!("the reload task failed"),
                }
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn agents_new(id: &str, role: &str, config: Option<&std::path::Path>) -> ExitCode {
    if let Some(path) = config {
        match config::load_file(path) {
            Ok(config) if !config.roles.contains_key(role) => {
                eprintln!(
                    "keyward: {} has no role '{role}' (roles: {})",
                    path.display(),
                    config.roles.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                return ExitCode::from(2);
            }
            Ok(config) => warn_if_agent_exists(&config, id, path),
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(2);
            }
        }
    } else if let Ok(config) = config::load_file(std::path::Path::new(config::DEFAULT_CONFIG_PATH)) {
        // No config named: the one `serve` would use, if it is here and loads.
        warn_if_agent_exists(&config, id, std::path::Path::new(config::DEFAULT_CONFIG_PATH));
    }
    let key = identity::generate_key();
    let hash = hex::encode(identity::hash_key(&key));
    println!("agent key for '{id}' (shown once; give it to the agent, keyward keeps only its hash):");
    println!();
    println!("  {key}");
    println!();
    println!("add this to the config:");
    println!();
    println!("[[agents]]");
    println!("id = {}", toml_string(id));
    println!("role = {}", toml_string(role));
    println!("key_sha256 = \"{hash}\"");
    ExitCode::SUCCESS
}

/// A second `[[agents]]` entry with the same id is refused by `check`; a user may instead mean
/// to give the existing agent a new key. Say so before the key is printed.
fn warn_if_agent_exists(config: &Config, id: &str, path: &std::path::Path) {
    if let Some(existing) = config.agents.iter().find(|a| a.id == id) {
        eprintln!(
            "warning: {} already has an agent '{id}' (role '{}'). To give it this new key, replace its \
             key_sha256 with the one below (its old key stops working once the config is reloaded); \
             to add another agent, pick a different --id.",
            path.display(),
            existing.role
        );
    }
}

/// The audit files to read: those named, or the config's audit.path with its rotated files.
fn audit_files(
    paths: Vec<PathBuf>,
    config: Option<&std::path::Path>,
) -> Result<(Vec<PathBuf>, Option<Config>), ExitCode> {
    if paths.is_empty() {
        let (config, _) = load(config)?;
        let files = keyward::audit::read::expand(std::slice::from_ref(&config.audit.path));
        Ok((files, Some(config)))
    } else {
        let config = config.map(|p| load(Some(p))).transpose()?.map(|(c, _)| c);
        Ok((keyward::audit::read::expand(&paths), config))
    }
}

fn audit_verify(paths: Vec<PathBuf>, config: Option<&std::path::Path>) -> ExitCode {
    let (files, _) = match audit_files(paths, config) {
        Ok(found) => found,
        Err(code) => return code,
    };
    if files.is_empty() {
        eprintln!("keyward: no audit files found");
        return ExitCode::from(2);
    }
    match keyward::audit::read::verify(&files) {
        Ok(verified) => {
            println!("audit chain intact: {} records in {} file(s)", verified.records, verified.files);
            ExitCode::SUCCESS
        }
        Err(broken) => {
            println!("audit chain BROKEN at {broken}");
            ExitCode::FAILURE
        }
    }
}

fn audit_report(since: &str, format: ReportFormat, paths: Vec<PathBuf>, config: Option<&std::path::Path>) -> ExitCode {
    let since = match keyward::audit::read::parse_time(since) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keyward: --since {e}");
            return ExitCode::from(2);
        }
    };
    let (files, config) = match audit_files(paths, config) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let report = keyward::audit::report::build(&files, since, config.as_ref());
    match format {
        ReportFormat::Text => print!("{}", keyward::audit::report::text(&report)),
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report).expect("reports serialize")),
        ReportFormat::Html => println!("{}", keyward::audit::report::html(&report)),
    }
    ExitCode::SUCCESS
}

/// The config's `[forward_proxy]` and its CA (generated if absent), or the exit code after
/// saying what is missing.
fn forward_ca(
    config: Option<&std::path::Path>,
) -> Result<(Config, config::ForwardProxyConfig, keyward::CertAuthority), ExitCode> {
    let (config, name) = load(config)?;
    let Some(forward) = config.forward_proxy.clone() else {
        eprintln!(
            "keyward: {name} has no [forward_proxy] section (add `[forward_proxy]` with `listen = \"127.0.0.1:8081\"`)"
        );
        return Err(ExitCode::from(2));
    };
    match keyward::CertAuthority::load_or_create(&forward.ca_cert_file, &forward.ca_key_file, forward.leaf_validity) {
        Ok(ca) => Ok((config, forward, ca)),
        Err(error) => {
            eprintln!("keyward: {error:#}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn ca_export(bundle: bool, config: Option<&std::path::Path>) -> ExitCode {
    let ca = match forward_ca(config) {
        Ok((_, _, ca)) => ca,
        Err(code) => return code,
    };
    if bundle {
        use base64::Engine;
        let system = rustls_native_certs::load_native_certs();
        if system.certs.is_empty() {
            eprintln!("keyward: no system trust store found; the bundle holds keyward's CA only");
        }
        for cert in system.certs {
            let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
            println!("-----BEGIN CERTIFICATE-----");
            for line in text.as_bytes().chunks(64) {
                println!("{}", String::from_utf8_lossy(line));
            }
            println!("-----END CERTIFICATE-----");
        }
    }
    print!("{}", ca.cert_pem());
    ExitCode::SUCCESS
}

fn agent_env(
    agent: &str,
    with_key: bool,
    proxy_host: Option<&str>,
    ca_path: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let (config, forward, _) = match forward_ca(config) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let Some(entry) = config.agents.iter().find(|a| a.id == agent) else {
        let ids: Vec<&str> = config.agents.iter().map(|a| a.id.as_str()).collect();
        eprintln!("keyward: no agent '{agent}' in the config (agents: {})", ids.join(", "));
        return ExitCode::from(2);
    };
    let key = if with_key {
        let Some(key) = std::env::var("KEYWARD_AGENT_KEY").ok().filter(|k| !k.is_empty()) else {
            eprintln!("keyward: --with-key reads the agent's key from $KEYWARD_AGENT_KEY, which is not set");
            return ExitCode::from(2);
        };
        if entry.key_sha256 != Some(identity::hash_key(&key)) {
            eprintln!("keyward: $KEYWARD_AGENT_KEY is not the key of agent '{agent}' in the config");
            return ExitCode::from(2);
        }
        key
    } else {
        "<agent-key>".to_string()
    };
    let host = match proxy_host {
        Some(host) => host.to_string(),
        None if forward.listen.ip().is_unspecified() => {
            eprintln!(
                "keyward: forward_proxy.listen is {}; pass --proxy-host with the name agents reach keyward by",
                forward.listen
            );
            return ExitCode::from(2);
        }
        None => match forward.listen {
            std::net::SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
            v4 => v4.ip().to_string(),
        },
    };
    if forward.listen.port() == 0 {
        eprintln!("keyward: forward_proxy.listen has port 0 (any free port): give it a fixed port agents can be told");
        return ExitCode::from(2);
    }
    let ca = ca_path.map_or_else(|| forward.ca_cert_file.display().to_string(), |p| p.display().to_string());
    // Agent ids are letters, digits and -_.: (validated), none of which needs escaping in a URL
    // user name except ':'.
    let user = agent.replace(':', "%3A");
    // A key chosen by hand may hold '@', '/', '#' or '%', which would split the URL elsewhere;
    // the placeholder and generated keys pass through unchanged.
    let key = if with_key {
        // RFC 3986 unreserved characters stay as they are.
        const USERINFO: &percent_encoding::AsciiSet =
            &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
        percent_encoding::utf8_percent_encode(&key, USERINFO).to_string()
    } else {
        key.to_string()
    };
    let proxy = format!("http://{user}:{key}@{host}:{}", forward.listen.port());
    if !with_key {
        eprintln!(
            "# replace <agent-key> with agent '{agent}''s key, or run with --with-key and $KEYWARD_AGENT_KEY set"
        );
    }
    for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        println!("{name}={proxy}");
    }
    for name in ["NO_PROXY", "no_proxy"] {
        println!("{name}=localhost,127.0.0.1,::1");
    }
    for name in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"] {
        println!("{name}={ca}");
    }
    ExitCode::SUCCESS
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings always serialize")
}
