//! A pseudo-terminal for the tests that must see what an operator sees: the
//! built binary runs with a terminal as stdin, stdout and stderr (its own
//! session, the terminal its controlling one, so Ctrl-C typed into it is a
//! SIGINT), at a given size; the test reads everything it draws and types
//! into it. Waits are on the output itself, never on the clock.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::harness::bin;

/// What the terminal has shown so far, and whether the program closed it.
#[derive(Default)]
struct Screen {
    bytes: Vec<u8>,
    closed: bool,
}

/// `pgshift` running in a pseudo-terminal.
pub struct Pty {
    master: File,
    child: Child,
    screen: Arc<(Mutex<Screen>, Condvar)>,
}

fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

impl Pty {
    /// Starts `pgshift ARGS` on a `cols`×24 terminal with `env` set.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], cols: u16) -> Pty {
        // SAFETY: plain libc calls on descriptors this function owns.
        let (master, slave) = unsafe {
            let m = check(
                libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY),
                "posix_openpt",
            );
            check(libc::grantpt(m), "grantpt");
            check(libc::unlockpt(m), "unlockpt");
            let mut name = [0 as libc::c_char; 128];
            check(
                libc::ptsname_r(m, name.as_mut_ptr(), name.len()),
                "ptsname_r",
            );
            let s = check(
                libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY),
                "open slave",
            );
            let ws = libc::winsize {
                ws_row: 24,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            check(libc::ioctl(m, libc::TIOCSWINSZ, &ws), "TIOCSWINSZ");
            (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
        };
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_remove("DATABASE_URL")
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start pgshift in a pseudo-terminal");
        let master = File::from(master);
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let mut reader = master.try_clone().unwrap();
        let sc = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // EIO once every copy of the slave side is closed: the program exited.
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*sc;
                let mut s = lock.lock().unwrap();
                if n == 0 {
                    s.closed = true;
                    cv.notify_all();
                    return;
                }
                s.bytes.extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        });
        Pty {
            master,
            child,
            screen,
        }
    }

    /// Everything shown so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.0.lock().unwrap().bytes).into_owned()
    }

    /// Waits until the output contains `needle` (after escape codes are removed);
    /// fails the test with what was shown if it does not within `limit`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let (lock, cv) = &*self.screen;
        let mut s = lock.lock().unwrap();
        loop {
            let text = plain(&String::from_utf8_lossy(&s.bytes));
            if text.contains(needle) {
                return text;
            }
            let now = Instant::now();
            assert!(
                now < deadline && !s.closed,
                "the terminal never showed {needle:?}; it showed:\n{text}"
            );
            s = cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Types `text` (a `\n` is Enter).
    pub fn type_text(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    /// Presses Ctrl-C: the terminal sends SIGINT to the program.
    pub fn ctrl_c(&mut self) {
        self.type_text("\x03");
    }

    /// Waits for the program to exit (failing after `limit`) and for the
    /// terminal to drain; returns its status and everything it showed, raw.
    pub fn finish(self, limit: Duration) -> (ExitStatus, String) {
        let Pty {
            master,
            mut child,
            screen,
        } = self;
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(limit) {
            Ok(st) => st.expect("wait for pgshift"),
            Err(_) => {
                // SAFETY: signalling the child this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let shown = String::from_utf8_lossy(&screen.0.lock().unwrap().bytes).into_owned();
                panic!(
                    "pgshift did not exit within {limit:?}; it showed:\n{}",
                    plain(&shown)
                );
            }
        };
        // The reader sees the end of the output once the program's side is closed.
        let (lock, cv) = &*screen;
        let s = lock.lock().unwrap();
        let (s, _) = cv
            .wait_timeout_while(s, Duration::from_secs(5), |s| !s.closed)
            .unwrap();
        let text = String::from_utf8_lossy(&s.bytes).into_owned();
        drop(master);
        (status, text)
    }
}

/// `text` without terminal escape sequences (CSI `ESC [ … letter`, and `ESC x`).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // `ESC [ … letter` (CSI); any other escape is two characters.
        if chars.next() == Some('[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() || d == '~' {
                    break;
                }
            }
        }
    }
    out
}

/// Checks that every bar pgshift drew for the step shown as `prefix` fits in
/// `cols` columns. indicatif pads each line of a bar to the terminal's width
/// instead of ending it with a newline, so a bar's first line (`PREFIX [===> ]
/// 100/20000 rows`) fits when its `rows` ends within the first `cols`
/// characters and its second line (two spaces, then rate and ETA, or the hold
/// reason) starts exactly one width later; the closing line of a bar ends before
/// the terminal's last column.
pub fn bars_fit(raw: &str, prefix: &str, cols: usize) {
    let text: Vec<char> = plain(raw).chars().collect();
    let p: Vec<char> = prefix.chars().collect();
    let mut frames = 0;
    for start in 0..text.len().saturating_sub(p.len()) {
        if text[start..start + p.len()] != p[..] {
            continue;
        }
        let line: String = text[start..(start + 2 * cols).min(text.len())]
            .iter()
            .collect();
        let first: String = line.chars().take(cols).collect();
        if first.contains("interrupted at") || first.contains("done: ") {
            let end = first.trim_end().chars().count();
            assert!(end < cols, "a closing bar line of {end} columns: {first:?}");
            continue;
        }
        if !first.contains(" rows") {
            continue;
        }
        frames += 1;
        assert!(
            first.trim_end().ends_with(" rows"),
            "the first line of a bar does not fit in {cols} columns: {line:?}"
        );
        let second: String = line.chars().skip(cols).take(2).collect();
        assert!(
            second.is_empty() || second == "  ",
            "the second line of a bar does not start on the next row: {line:?}"
        );
    }
    assert!(
        frames > 0,
        "no bar of {prefix:?} was drawn:\n{}",
        plain(raw)
    );
}
