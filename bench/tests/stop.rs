//! A stopped coordinator leaves nothing behind: `tether-bench million` holding
//! connections (gateway shards and lean client processes up) gets SIGTERM or SIGINT,
//! exits with the signal's status, and every process it had started is gone.
//!
//! Needs the gateway binary: `cargo build -p tether-gateway` first.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tether_bench::children::{children_of, parent_of};

fn stat_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    after.split_whitespace().next()?.chars().next()
}

/// Gone, or a zombie waiting for its new parent to reap it.
fn ended(pid: u32) -> bool {
    matches!(stat_state(pid), None | Some('Z'))
}

fn stop_with(signal: libc::c_int) {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tether-bench"));
    assert!(
        bench.with_file_name("tether-gateway").exists(),
        "build the gateway first: cargo build -p tether-gateway"
    );
    // Two shards and two lean clients, then a long idle phase to be stopped in.
    let mut coordinator = Command::new(&bench)
        .args([
            "million",
            "-n",
            "60",
            "--per-process",
            "30",
            "--rate",
            "600",
            "--idle",
            "600",
            "--targets",
            "tether",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether-bench starts");
    let pid = coordinator.id();
    let stderr = BufReader::new(coordinator.stderr.take().expect("stderr"));
    let (seen, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = seen.send(line);
        }
    });
    // The idle phase starts once every connection is open.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the coordinator reaches the idle phase");
        if line.trim_start().starts_with("idle") {
            break;
        }
    }
    let started = children_of(pid);
    assert_eq!(
        started.len(),
        4,
        "two gateway shards and two lean clients: {started:?}"
    );

    // SAFETY: kill(2) on the PID of the child this test spawned and has not reaped.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0);
    let status = coordinator.wait().expect("the coordinator ends");
    assert_eq!(status.code(), Some(128 + signal), "{status:?}");

    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.iter().all(|child| ended(*child)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<(u32, Option<u32>)> = started
        .iter()
        .filter(|child| !ended(**child))
        .map(|child| (*child, parent_of(*child)))
        .collect();
    assert!(left.is_empty(), "still running (pid, parent): {left:?}");
}

#[test]
fn sigterm_stops_the_shards_and_clients_too() {
    stop_with(libc::SIGTERM);
}

#[test]
fn sigint_stops_the_shards_and_clients_too() {
    stop_with(libc::SIGINT);
}
