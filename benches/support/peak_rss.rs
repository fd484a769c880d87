//! Waits for a child process while reading its peak resident set size.

use std::process::{Child, Output};
use std::time::Duration;

/// Waits for `child` to exit, reading its VmHWM from /proc every 20 ms. VmHWM
/// only grows, so the last reading before it exits is its peak (KiB; 0 when
/// /proc could not be read). Its stdout and stderr are collected as piped.
pub fn wait(mut child: Child) -> (Output, u64) {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        }) {
            peak = peak.max(kib);
        }
        if child.try_wait().expect("wait for the child").is_some() {
            return (child.wait_with_output().expect("the child's output"), peak);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
