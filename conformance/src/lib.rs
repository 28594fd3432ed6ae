//! The harness of the SDK conformance suite (`tests/sdk.rs`): which SDKs there are and
//! how to launch each one's CLI, and a [`Cli`] process whose stdout lines (one JSON
//! object per event, `conformance/README.md`) a scenario waits on.
//!
//! ```text
//!  SDKS (name, env override, default command) --sdk()--> Sdk::command()
//!  Cli::spawn(sdk, flags) --> child process
//!      stdout reader task --JSON lines--> Cli::line(pred) / Cli::finish()
//!      stderr reader task --> Cli::stderr() (and the test's own stderr)
//! ```
//!
//! A missing CLI or runtime panics with the command that installs it: a conformance
//! run that silently skipped an SDK would claim what it did not check.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
};

/// How long one step of a scenario may take before it fails.
pub const STEP: Duration = Duration::from_secs(30);

/// One SDK under test.
#[derive(Debug, Clone, Copy)]
pub struct Sdk {
    /// The name in test names (`push::python`).
    pub name: &'static str,
    /// An environment variable that, when set, replaces the default command (split on
    /// spaces).
    pub env: &'static str,
    /// The default command, relative to the workspace (`{target}` is the target dir).
    pub default: &'static [&'static str],
    /// How to install the CLI when it is missing.
    pub install: &'static str,
}

/// Every SDK the suite knows. Adding an SDK: one row here, and its name in the
/// `conformance!` invocation of `tests/sdk.rs`.
pub const SDKS: &[Sdk] = &[
    Sdk {
        name: "rust",
        env: "TETHER_CONFORMANCE_RUST",
        default: &["{target}/debug/tether-agent"],
        install: "cargo build -p tether-agent",
    },
    Sdk {
        name: "python",
        env: "TETHER_CONFORMANCE_PYTHON",
        default: &["{target}/python-sdk-venv/bin/tether-agent"],
        install: "scripts/install-deps (a venv with `pip install -e sdk/python`)",
    },
    Sdk {
        name: "typescript",
        env: "TETHER_CONFORMANCE_TYPESCRIPT",
        default: &["node", "{workspace}/sdk/typescript/dist/cli.js"],
        install: "scripts/install-deps (`npm ci && npm run build` in sdk/typescript)",
    },
];

/// The SDK called `name`; panics for an unknown one.
pub fn sdk(name: &str) -> Sdk {
    *SDKS
        .iter()
        .find(|sdk| sdk.name == name)
        .unwrap_or_else(|| panic!("no SDK named {name} in SDKS"))
}

/// The workspace root (this crate's parent).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .to_path_buf()
}

/// The target directory: `CARGO_TARGET_DIR`, else `target` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace().join(dir)
            }
        })
        .unwrap_or_else(|| workspace().join("target"))
}

impl Sdk {
    /// The command prefix (program and leading arguments). Panics, naming the install
    /// command, when the program does not exist or is older than the sources it was
    /// built from.
    pub fn command(&self) -> Vec<String> {
        let from_env = std::env::var(self.env)
            .ok()
            .filter(|v| !v.trim().is_empty());
        let command: Vec<String> = match &from_env {
            Some(value) => value.split_whitespace().map(str::to_owned).collect(),
            None => {
                let target = target_dir();
                self.default
                    .iter()
                    .map(|part| {
                        part.replace("{target}", &target.to_string_lossy())
                            .replace("{workspace}", &workspace().to_string_lossy())
                    })
                    .collect()
            }
        };
        let program = Path::new(&command[0]);
        let found = if program.components().count() > 1 {
            program.exists()
        } else {
            which(&command[0]).is_some()
        };
        assert!(
            found,
            "the {} SDK's CLI `{}` is missing: install it with {} (or set {})",
            self.name,
            command.join(" "),
            self.install,
            self.env
        );
        for arg in &command[1..] {
            let path = Path::new(arg);
            if path.is_absolute() {
                assert!(
                    path.exists(),
                    "the {} SDK's CLI needs {arg}, which is missing: install it with {}",
                    self.name,
                    self.install
                );
            }
        }
        if self.name == "rust" && from_env.is_none() {
            let built = modified(program);
            for dir in ["agent/src", "protocol/src"] {
                let newest = newest_in(&workspace().join(dir));
                assert!(
                    built >= newest,
                    "{} is older than {dir}: rebuild it with {}",
                    program.display(),
                    self.install
                );
            }
        }
        command
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn newest_in(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let time = if path.is_dir() {
                newest_in(&path)
            } else {
                modified(&path)
            };
            newest = newest.max(time);
        }
    }
    newest
}

/// One stdout line: its text as written and its JSON.
#[derive(Debug, Clone)]
pub struct Line {
    /// The line as the CLI wrote it.
    pub text: String,
    /// The line parsed.
    pub json: Value,
}

impl Line {
    /// The line's `type`.
    pub fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or_default()
    }
}

/// A running SDK CLI.
pub struct Cli {
    sdk: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Result<Line, String>>,
    stderr: Arc<Mutex<String>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
    /// Every line read so far, in order.
    pub seen: Vec<Line>,
}

impl Cli {
    /// Starts `<sdk command> connect <args>` with a clean environment for what the CLIs
    /// read (`TETHER_*`, proxies), so the test alone decides.
    pub fn spawn(sdk: Sdk, args: &[&str]) -> Self {
        Self::spawn_with_env(sdk, args, &[])
    }

    /// [`Cli::spawn`] with extra environment variables.
    pub fn spawn_with_env(sdk: Sdk, args: &[&str], env: &[(&str, &str)]) -> Self {
        let command = sdk.command();
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..]).arg("connect").args(args);
        for (name, _) in std::env::vars() {
            let upper = name.to_ascii_uppercase();
            if upper.starts_with("TETHER_")
                || matches!(
                    upper.as_str(),
                    "HTTPS_PROXY" | "HTTP_PROXY" | "NO_PROXY" | "ALL_PROXY" | "RUST_LOG"
                )
            {
                cmd.env_remove(&name);
            }
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e} ({})", command.join(" "), sdk.install));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(text)) = reader.next_line().await {
                let parsed = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .map(|json| Line {
                        text: text.clone(),
                        json,
                    })
                    .ok_or_else(|| format!("stdout line is not one JSON object: {text}"));
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let name = sdk.name;
        let err = child.stderr.take().expect("piped stderr");
        let stderr_task = tokio::spawn(async move {
            let mut reader = BufReader::new(err).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{name}] {line}");
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let stdin = child.stdin.take();
        Self {
            sdk: sdk.name,
            child,
            stdin,
            lines,
            stderr,
            stderr_task: Some(stderr_task),
            seen: Vec::new(),
        }
    }

    /// Everything the CLI wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the next stdout line that satisfies `pred` (lines before it are kept
    /// in [`Cli::seen`]); panics with the CLI's stderr after [`STEP`] or at EOF.
    pub async fn line(&mut self, what: &str, pred: impl Fn(&Line) -> bool) -> Line {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(Ok(line))) => {
                    eprintln!("[{}] stdout {}", self.sdk, line.text);
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Ok(Some(Err(bad))) => panic!("[{}] {bad}", self.sdk),
                Ok(None) => panic!(
                    "[{}] stdout ended while waiting for {what}; stderr:\n{}",
                    self.sdk,
                    self.stderr()
                ),
                Err(_) => panic!(
                    "[{}] no {what} within {STEP:?}; lines so far: {:?}; stderr:\n{}",
                    self.sdk,
                    self.seen.iter().map(|l| &l.text).collect::<Vec<_>>(),
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the next line of type `kind`.
    pub async fn next(&mut self, kind: &str) -> Line {
        self.line(&format!("a `{kind}` line"), |l| l.kind() == kind)
            .await
    }

    /// Writes one line to the CLI's stdin (releases one push under `--ack-on-stdin`).
    pub async fn release(&mut self, lines: usize) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all("\n".repeat(lines).as_bytes())
            .await
            .expect("the CLI reads stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the CLI to exit by itself; returns its exit code and stderr.
    pub async fn exit(mut self) -> (Option<i32>, String) {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "[{}] did not exit within {STEP:?}; stderr:\n{}",
                    self.sdk,
                    self.stderr()
                )
            })
            .expect("wait");
        // The reader tasks read to EOF: wait for the rest of the pipes.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.lines.recv().await.is_some() {}
            if let Some(task) = self.stderr_task.take() {
                let _ = task.await;
            }
        })
        .await;
        (status.code(), self.stderr())
    }

    /// Kills the CLI and returns every stdout line it ever wrote (read to EOF).
    pub async fn kill(mut self) -> Vec<Line> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        while let Ok(Some(next)) = tokio::time::timeout(STEP, self.lines.recv()).await {
            match next {
                Ok(line) => self.seen.push(line),
                Err(bad) => panic!("[{}] {bad}", self.sdk),
            }
        }
        self.seen
    }

    /// Sends SIGTERM and waits for the exit code.
    pub async fn terminate(self) -> (Option<i32>, String) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        self.exit().await
    }
}

/// Reads `key` from a JSON object line as a string.
pub fn text(line: &Line, key: &str) -> String {
    line.json[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {}", line.text))
        .to_owned()
}
