//! Stopping what the bench started when the bench itself is stopped.
//!
//! The coordinator starts server shards and client processes. On a normal end it stops
//! each one; but a SIGINT (ctrl-c) or SIGTERM (`timeout`, `kill`) ends the coordinator
//! at once with the default action, no destructor runs, and the shards — whose stdin
//! is not a pipe from us — stay up holding their ports and memory. So the coordinator
//! catches both signals, kills its own children and exits with the signal's status
//! (128 + its number).
//!
//! Children are found in `/proc` by parent PID at that moment instead of being kept in
//! a list: a process that already ended and was reaped is not there, so a PID reused by
//! an unrelated process is never signalled. A SIGKILL of the coordinator cannot be
//! caught; then `pkill -KILL -P <coordinator pid>` before it is reaped, or the shards'
//! command lines, find them (docs/benchmarks.md).

use std::io;

use tokio::signal::unix::{SignalKind, signal};

/// PIDs whose parent is `parent`, read from `/proc/<pid>/stat`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(parent))
        .collect()
}

/// The parent PID in `/proc/<pid>/stat` (`None` once the process is gone).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_parent(&stat)
}

/// The fourth field of a `stat` line; the command name (second field) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_parent(stat: &str) -> Option<u32> {
    let (_, after) = stat.rsplit_once(')')?;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGKILL to every child of this process; returns how many were signalled.
pub fn kill_children() -> usize {
    let me = std::process::id();
    children_of(me)
        .into_iter()
        .filter(|pid| send(*pid, libc::SIGKILL).is_ok())
        .count()
}

#[allow(unsafe_code)]
fn send(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: kill(2) takes a PID and a signal number and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for SIGINT or SIGTERM; returns its number.
pub async fn stop_signal() -> io::Result<i32> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        assert_eq!(parse_parent("42 (tether-bench) S 7 42 7 0"), Some(7));
        assert_eq!(parse_parent("42 (a) b (c)) R 9 1"), Some(9));
        assert_eq!(parse_parent("garbage"), None);
    }

    #[test]
    fn this_process_is_a_child_of_its_parent() {
        let me = std::process::id();
        let parent = parent_of(me).expect("our own stat");
        assert!(children_of(parent).contains(&me));
    }
}
