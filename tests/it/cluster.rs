//! A PostgreSQL cluster of the test's own, for the tests that must restart a
//! server or stream to a replica. Started from the installed server binaries in
//! a temporary directory, as the `postgres` user when the tests run as root
//! (initdb refuses root); stopped and removed on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

fn server_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .filter(|d| d.join("initdb").is_file())
        .expect("PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) are needed: apt-get install postgresql")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("pgshift-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let as_postgres = is_root();
        if as_postgres {
            assert!(
                Command::new("chown")
                    .arg("postgres")
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success(),
                "chown {} to postgres",
                dir.display()
            );
        }
        Cluster {
            dir,
            port: free_port(),
            bin: server_bin(),
            as_postgres,
        }
    }

    /// initdb + start a primary that allows streaming replication.
    pub fn primary(name: &str) -> Cluster {
        Cluster::primary_with(name, "")
    }

    /// A primary with `conf` added to its settings (`wal_level = logical`, …).
    pub fn primary_with(name: &str, conf: &str) -> Cluster {
        let c = Cluster::new(name);
        let data = c.data();
        c.tool(
            "initdb",
            &["-D", s(&data), "-U", "postgres", "-A", "trust", "--no-sync"],
        );
        std::fs::write(
            data.join("postgresql.auto.conf"),
            format!("wal_level = replica\nmax_wal_senders = 5\nfsync = off\nlisten_addresses = '127.0.0.1'\n{conf}\n"),
        )
        .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .map(|mut f| {
                std::io::Write::write_all(&mut f, b"host replication all 127.0.0.1/32 trust\n")
            })
            .unwrap()
            .unwrap();
        c.start();
        c
    }

    /// A streaming replica of `primary` (pg_basebackup -R).
    pub fn replica_of(primary: &Cluster, name: &str) -> Cluster {
        let c = Cluster::new(name);
        let data = c.data();
        c.tool(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                s(&data),
                "-R",
                "-X",
                "stream",
            ],
        );
        c.start();
        c
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn start(&self) {
        let opts = format!("-p {} -k {}", self.port, s(&self.dir));
        self.tool(
            "pg_ctl",
            &[
                "-D",
                s(&self.data()),
                "-o",
                &opts,
                "-l",
                s(&self.dir.join("log")),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        self.tool(
            "pg_ctl",
            &["-D", s(&self.data()), "-m", "fast", "-w", "stop"],
        );
    }

    /// Stops, waits `down`, starts again.
    pub fn restart_after(&self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.start();
    }

    fn tool(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", s(&data), "-m", "immediate", "-w", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .arg("-u")
                .arg("postgres")
                .arg("--")
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
