//! `tether-agent`: a small agent for manual use and demos. It connects, prints every push
//! as a JSON line on stdout, and answers requests with a fixed reply or by running a
//! command (request data on stdin, its stdout is the answer).
//!
//! Output lines use the protocol's vocabulary (`docs/protocol.md`): every session opens
//! with `{"type":"welcome","agent_id","connection_id","expires_at"}`, an in-band token
//! refresh prints `{"type":"refreshed","expires_at"}`, a push prints as the `push`
//! envelope it came in (`{"type":"push","id","data"}`, data byte for byte), a request as
//! `{"type":"request","id","data","timeout_ms"}`, an acknowledged `--send` as
//! `{"type":"ack","id"}`; a binary frame as `{"type":"binary","len"}`. Logs go to stderr.
//! Every SDK's CLI prints the same lines and exits with the same codes
//! (`conformance/README.md`): 0 after Ctrl-C/SIGTERM or `--exit-after-send`, 1 when the
//! agent stopped for good.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use tether_agent::{
    Agent, ClientCert, ErrorBody, ErrorCode, Hs256Minter, Options, Payload, Proxy, RawValue,
    StaticToken, TlsOptions, TokenFile, TokenProvider,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(
    name = "tether-agent",
    version,
    about = "Connect to a Tether gateway as an agent"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect, print pushes, answer requests; runs until Ctrl-C or a terminal close.
    Connect(Box<ConnectArgs>),
    /// Print a development token minted with the gateway's HS256 secret.
    Token(TokenArgs),
}

#[derive(ClapArgs, Debug)]
struct TokenArgs {
    /// File with the gateway's HS256 secret (`auth.jwt.hs256SecretFile`; the dev
    /// gateway prints its path).
    #[arg(
        long,
        env = "TETHER_HS256_SECRET_FILE",
        conflicts_with = "hs256_secret"
    )]
    hs256_secret_file: Option<PathBuf>,
    /// The gateway's HS256 secret itself (what the local platform prints); the same
    /// secret `tether-bench --hs256-secret` takes.
    #[arg(long, env = "TETHER_HS256_SECRET", hide_env_values = true)]
    hs256_secret: Option<String>,
    /// Agent id (`sub`) of minted tokens.
    #[arg(long, env = "TETHER_AGENT_ID", default_value = "dev-agent")]
    agent_id: String,
    /// Groups claim of minted tokens, comma-separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Lifetime of minted tokens, in seconds (the SDK refreshes them in band).
    #[arg(long, default_value_t = 3600)]
    ttl_seconds: u64,
    /// Tenant claim of minted tokens.
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(ClapArgs, Debug)]
struct ConnectArgs {
    /// Gateway URL.
    #[arg(
        long,
        env = "TETHER_URL",
        default_value = "ws://127.0.0.1:8080/v1/connect"
    )]
    url: String,
    /// A bearer token.
    #[arg(long, env = "TETHER_TOKEN", conflicts_with_all = ["token_file", "hs256_secret_file", "hs256_secret"])]
    token: Option<String>,
    /// A file holding the token, re-read on every connect and refresh.
    #[arg(long, env = "TETHER_TOKEN_FILE", conflicts_with_all = ["hs256_secret_file", "hs256_secret"])]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    mint: TokenArgs,
    /// Answer every request with this JSON.
    #[arg(long, conflicts_with = "exec")]
    reply: Option<String>,
    /// Answer requests by running this shell command: request data on stdin, stdout
    /// (JSON, or else taken as a string) is the answer; a non-zero exit is an error.
    #[arg(long)]
    exec: Option<String>,
    /// Send this JSON to the upstream once connected (repeatable); waits for each ack.
    #[arg(long)]
    send: Vec<String>,
    /// Exit after the `--send` messages are acknowledged instead of staying connected.
    #[arg(long)]
    exit_after_send: bool,
    /// Acknowledge each push only after reading one line from stdin (step through
    /// pushes by hand; the conformance suite loses an ack with it). It only delays an
    /// ack: no push is acknowledged before it was handled.
    #[arg(long)]
    ack_on_stdin: bool,
    #[command(flatten)]
    transport: TransportArgs,
}

/// TLS and proxy settings (`wss://`; the system roots, with `SSL_CERT_FILE` and
/// `SSL_CERT_DIR`, are always trusted).
#[derive(ClapArgs, Debug)]
struct TransportArgs {
    /// PEM file of CA certificates trusted in addition to the system roots.
    #[arg(long, env = "TETHER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for a gateway that requires mutual TLS.
    #[arg(long, env = "TETHER_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, env = "TETHER_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// HTTP proxy to tunnel through (`http://[user:password@]host:port`); overrides
    /// HTTPS_PROXY/HTTP_PROXY/NO_PROXY.
    #[arg(long, env = "TETHER_PROXY", conflicts_with = "direct")]
    proxy: Option<String>,
    /// Connect directly, ignoring HTTPS_PROXY/HTTP_PROXY.
    #[arg(long)]
    direct: bool,
}

impl TransportArgs {
    fn apply(self, options: &mut Options) {
        options.tls = TlsOptions {
            extra_ca_file: self.ca_file,
            client_cert: match (self.client_cert, self.client_key) {
                (Some(cert_file), Some(key_file)) => Some(ClientCert {
                    cert_file,
                    key_file,
                }),
                _ => None,
            },
        };
        options.proxy = match (self.proxy, self.direct) {
            (Some(url), _) => Proxy::Url(url),
            (None, true) => Proxy::Direct,
            (None, false) => Proxy::FromEnv,
        };
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tether_agent=info".into()),
        )
        // Colour codes only on a terminal: a log redirected to a file stays plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Connect(args) => {
            let result = connect(*args).await;
            // A pending stdin read (`--ack-on-stdin`) cannot be cancelled and would hold
            // up the runtime's shutdown: exit here, as `main` returning would.
            if let Err(err) = result {
                eprintln!("Error: {err:?}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        Command::Token(args) => {
            println!("{}", minter(&args)?.mint()?);
            Ok(())
        }
    }
}

fn minter(args: &TokenArgs) -> anyhow::Result<Hs256Minter> {
    let TokenArgs {
        hs256_secret_file,
        hs256_secret,
        agent_id,
        groups,
        ttl_seconds,
        tenant,
    } = args;
    let mut minter = match (hs256_secret_file, hs256_secret) {
        (Some(path), _) => Hs256Minter::from_secret_file(path, agent_id.clone())?,
        // Trimmed as the gateway trims its secret file, so both ways give one key.
        (None, Some(secret)) => Hs256Minter::new(secret.trim_end().as_bytes(), agent_id.clone()),
        (None, None) => {
            bail!("give --token, --token-file, --hs256-secret-file or --hs256-secret")
        }
    };
    minter.groups = groups.clone();
    minter.ttl = Duration::from_secs(*ttl_seconds);
    minter.tenant = tenant.clone();
    Ok(minter)
}

async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let ConnectArgs {
        url,
        token,
        token_file,
        mint,
        reply,
        exec,
        send,
        exit_after_send,
        ack_on_stdin,
        transport,
    } = args;
    let tokens: Arc<dyn TokenProvider> = match (token, token_file) {
        (Some(token), _) => Arc::new(StaticToken(token)),
        (None, Some(path)) => Arc::new(TokenFile(path)),
        (None, None) => Arc::new(minter(&mint)?),
    };
    let reply: Option<Box<RawValue>> = reply
        .map(|text| RawValue::from_string(text).context("--reply must be JSON"))
        .transpose()?;
    let sends = send
        .into_iter()
        .map(|text| RawValue::from_string(text).context("--send must be JSON"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let exec = exec.map(Arc::new);
    let mut options = Options {
        // A one-shot send fails at once with the gateway's reason when nothing upstream
        // receives agent messages, instead of retrying until someone presses Ctrl-C.
        retry_unavailable: !exit_after_send,
        ..Options::default()
    };
    transport.apply(&mut options);
    // One reader shared by the push handler (pushes are handled one at a time).
    let stdin = ack_on_stdin.then(|| {
        Arc::new(tokio::sync::Mutex::new(tokio::io::BufReader::new(
            tokio::io::stdin(),
        )))
    });
    // A session's `welcome` line comes before its pushes and requests: the session's
    // state and its frames reach this program on different tasks.
    let order = Arc::new(WelcomeFirst::default());
    let push_order = order.clone();
    let request_order = order.clone();
    let agent = Agent::builder_shared(url, tokens)
        .options(options)
        .on_push(move |push| {
            let stdin = stdin.clone();
            let order = push_order.clone();
            async move {
                order.welcome_printed().await;
                match &push.payload {
                    Payload::Json(data) => print_line(&PushLine {
                        kind: "push",
                        id: push.id.as_deref(),
                        data,
                    }),
                    Payload::Binary(bytes) => {
                        print_line(&serde_json::json!({"type": "binary", "len": bytes.len()}))
                    }
                }
                if let Some(stdin) = stdin {
                    let mut line = String::new();
                    let _ = stdin.lock().await.read_line(&mut line).await;
                }
            }
        })
        .on_request(move |request| {
            let reply = reply.clone();
            let exec = exec.clone();
            let order = request_order.clone();
            async move {
                order.welcome_printed().await;
                print_line(&RequestLine {
                    kind: "request",
                    id: &request.id,
                    data: &request.data,
                    timeout_ms: request.timeout.as_millis() as u64,
                });
                match (reply, exec) {
                    (Some(reply), _) => Ok(reply),
                    (None, Some(command)) => run_command(&command, request.data.get()).await,
                    (None, None) => Err(ErrorBody::new(
                        ErrorCode::HandlerError,
                        "no --reply or --exec given",
                    )),
                }
            }
        })
        .start()?;
    let _ = order.sessions.set(agent.state());
    tokio::spawn(print_sessions(agent.state(), order.clone()));
    let session = tokio::select! {
        session = agent.connected() => session?,
        _ = terminated() => {
            agent.close().await;
            return Ok(());
        }
    };
    eprintln!(
        "connected as {} (connection {})",
        session.agent_id, session.connection_id
    );
    for data in sends {
        let id = uuid_like();
        agent.send_raw(id.clone(), data).await?;
        order.welcome_printed().await;
        print_line(&serde_json::json!({"type": "ack", "id": id}));
    }
    if exit_after_send {
        agent.close().await;
        return Ok(());
    }
    let mut state = agent.state();
    tokio::select! {
        _ = terminated() => agent.close().await,
        stopped = state.wait_for(|s| matches!(s, tether_agent::State::Stopped(_))) => {
            if let Ok(state) = stopped
                && let tether_agent::State::Stopped(reason) = &*state
            {
                bail!("agent stopped: {reason}");
            }
        }
    }
    Ok(())
}

/// A push line: the envelope with `data` exactly as it came (a `RawValue` serializes
/// verbatim; `json!` would re-encode it).
#[derive(serde::Serialize)]
struct PushLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Option<&'a str>,
    data: &'a RawValue,
}

#[derive(serde::Serialize)]
struct RequestLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    data: &'a RawValue,
    timeout_ms: u64,
}

/// Prints one event as one line. `println!` on stdout flushes at each newline, so a
/// reader sees the line before the push's ack goes out.
fn print_line(line: &impl serde::Serialize) {
    match serde_json::to_string(line) {
        // A raw value may span lines (a backend's pretty JSON): newlines can only be
        // whitespace between its tokens, so they become spaces.
        Ok(text) => println!("{}", text.replace(['\n', '\r'], " ")),
        Err(err) => tracing::warn!(%err, "cannot print an event"),
    }
}

/// Keeps a session's lines in order: its `welcome` first.
#[derive(Default)]
struct WelcomeFirst {
    /// The agent's state, once it started.
    sessions: tokio::sync::SetOnce<tokio::sync::watch::Receiver<tether_agent::State>>,
    /// The number of the last session whose `welcome` line is printed.
    printed: tokio::sync::watch::Sender<u64>,
}

impl WelcomeFirst {
    /// Waits until the current session's `welcome` line is printed, or the session
    /// ended before it was (then there is no line to wait for).
    async fn welcome_printed(&self) {
        let mut state = self.sessions.wait().await.clone();
        let current = |state: &tether_agent::State| match state {
            tether_agent::State::Connected(session) => Some(session.number),
            _ => None,
        };
        let Some(number) = current(&state.borrow_and_update()) else {
            return;
        };
        let mut printed = self.printed.subscribe();
        loop {
            if *printed.borrow_and_update() >= number {
                return;
            }
            tokio::select! {
                changed = printed.changed() => if changed.is_err() { return },
                changed = state.changed() => {
                    if changed.is_err() || current(&state.borrow_and_update()) != Some(number) {
                        return;
                    }
                }
            }
        }
    }
}

/// Prints a `welcome` line for every new session and a `refreshed` line for every
/// in-band refresh of the current one.
async fn print_sessions(
    mut state: tokio::sync::watch::Receiver<tether_agent::State>,
    order: Arc<WelcomeFirst>,
) {
    let mut last: Option<tether_agent::Session> = None;
    loop {
        let session = match &*state.borrow_and_update() {
            tether_agent::State::Connected(session) => Some(session.clone()),
            _ => None,
        };
        if let Some(session) = session {
            match &last {
                Some(prev) if prev.number == session.number => {
                    if prev.expires_at != session.expires_at {
                        print_line(
                            &serde_json::json!({"type": "refreshed", "expires_at": session.expires_at}),
                        );
                    }
                }
                _ => {
                    print_line(&serde_json::json!({
                        "type": "welcome",
                        "agent_id": session.agent_id,
                        "connection_id": session.connection_id,
                        "expires_at": session.expires_at,
                    }));
                    order.printed.send_replace(session.number);
                }
            }
            last = Some(session);
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Ctrl-C or SIGTERM (what `kill` and Kubernetes send).
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn uuid_like() -> String {
    format!(
        "cli-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

async fn run_command(command: &str, input: &str) -> Result<Box<RawValue>, ErrorBody> {
    let fail = |message: String| ErrorBody::new(ErrorCode::HandlerError, message);
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("spawning command: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("running command: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "command exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match RawValue::from_string(stdout.clone()) {
        Ok(json) => Ok(json),
        Err(_) => serde_json::value::to_raw_value(&stdout).map_err(|e| fail(e.to_string())),
    }
}
