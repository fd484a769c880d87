//! A network round trip between the client and the server, for the 2 ms case.
//!
//! The real thing, when the machine allows it (root, `ip`, `tc`, the kernel's
//! `sch_netem`): a network namespace joined to the host by a veth pair, with
//! `tc netem delay 1ms` on both ends. The clients (the plain loop and pgshift)
//! run inside the namespace and reach the server through a forwarder on the
//! host's end of the pair (the server listens on 127.0.0.1 only).
//!
//! When that cannot be set up, the benchmark says why and uses a delay line in
//! user space instead: a forwarder on 127.0.0.1 that holds every chunk for 1 ms
//! in each direction (threads and `std::thread::sleep`, accurate to ~0.1 ms).
//! Both ways every byte is delayed; neither limits bandwidth.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const NS: &str = "pgshift_bench";
const HOST_IP: &str = "10.231.0.1";
const NS_IP: &str = "10.231.0.2";

/// How the delay is made, and how to reach the server through it.
pub struct Rtt {
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// `Some(namespace)`: clients must run inside it (`ip netns exec`).
    pub namespace: Option<String>,
    pub how: String,
}

impl Rtt {
    /// Sets up a 2 ms round trip to `server` (host:port of the real server).
    pub fn setup(server: SocketAddr) -> Rtt {
        match netem() {
            Ok(()) => {
                let addr = forward(&format!("{HOST_IP}:0"), server, Duration::ZERO);
                Rtt {
                    addr,
                    namespace: Some(NS.into()),
                    how: format!(
                        "tc netem delay 1ms on both ends of a veth pair ({NS_IP} ↔ {HOST_IP}), clients in network namespace {NS}"
                    ),
                }
            }
            Err(why) => {
                teardown();
                let addr = forward("127.0.0.1:0", server, Duration::from_millis(1));
                Rtt {
                    addr,
                    namespace: None,
                    how: format!(
                        "tc netem could not be set up ({why}); a user-space delay line holds every chunk 1 ms in each direction instead"
                    ),
                }
            }
        }
    }

    /// A command that runs `program` where the clients must run.
    pub fn command(&self, program: &std::path::Path) -> Command {
        match &self.namespace {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Rtt {
    fn drop(&mut self) {
        if self.namespace.is_some() {
            teardown();
        }
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn netem() -> Result<(), String> {
    teardown();
    let ns = |rest: &[&str]| {
        let mut a = vec!["ip", "netns", "exec", NS];
        a.extend_from_slice(rest);
        run(&a)
    };
    run(&["ip", "netns", "add", NS])?;
    run(&[
        "ip", "link", "add", "pgsb0", "type", "veth", "peer", "name", "pgsb1",
    ])?;
    run(&["ip", "link", "set", "pgsb1", "netns", NS])?;
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_IP}/30"),
        "dev",
        "pgsb0",
    ])?;
    run(&["ip", "link", "set", "pgsb0", "up"])?;
    ns(&["ip", "addr", "add", &format!("{NS_IP}/30"), "dev", "pgsb1"])?;
    ns(&["ip", "link", "set", "pgsb1", "up"])?;
    ns(&["ip", "link", "set", "lo", "up"])?;
    run(&[
        "tc", "qdisc", "add", "dev", "pgsb0", "root", "netem", "delay", "1ms",
    ])?;
    ns(&[
        "tc", "qdisc", "add", "dev", "pgsb1", "root", "netem", "delay", "1ms",
    ])?;
    Ok(())
}

fn teardown() {
    let _ = run(&["ip", "link", "del", "pgsb0"]);
    let _ = run(&["ip", "netns", "del", NS]);
}

/// Listens on `listen`, forwards every connection to `server`, each chunk held
/// `delay` in each direction. Returns the address it listens on.
fn forward(listen: &str, server: SocketAddr, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(server) else {
                continue;
            };
            for s in [&client, &upstream] {
                let _ = s.set_nodelay(true);
            }
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            pump(client, upstream, delay);
            pump(u2, c2, delay);
        }
    });
    addr
}

/// Copies `from` to `to`, every chunk `delay` late, in order.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
