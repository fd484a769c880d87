//! `pgshift demo`: the newcomer's first run, on the bundled Clarivum plans.
//!
//! It creates (or with `--fresh` recreates) the `pgshift_demo` database, applies
//! the v0 schema, loads the deterministic fixtures, applies the hashed-email
//! migration with its progress bars (passing its gate on the operator's behalf,
//! and saying so), then prints `status` and a three-line summary. With no
//! database URL and no server at the default address it starts a throwaway
//! PostgreSQL from the installed server binaries in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cli::Global;
use crate::db;
use crate::exec::{self, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan;

const DEMO_DB: &str = "pgshift_demo";
const PLAN_0001: &str = include_str!("../plans/clarivum/0001_core_schema.yaml");
const PLAN_0002: &str = include_str!("../plans/clarivum/0002_leads_email_hash.yaml");
const FIXTURES: &str = include_str!("../plans/clarivum/fixtures.sql");

/// Runs the demo; returns the exit code.
pub fn run(g: &Global, fresh: bool, leads: u32) -> Exit {
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let mut throwaway = None;
        let server = match &g.database_url {
            Some(url) => url.clone(),
            None => {
                let default = db::Target::parse(db::DEFAULT_URL).expect("default URL parses");
                if db::connect(&default).await.is_ok() {
                    db::DEFAULT_URL.to_string()
                } else {
                    match Throwaway::start() {
                        Ok(t) => {
                            eprintln!("pgshift demo: no server answers at 127.0.0.1:5432 and DATABASE_URL is not set; started a throwaway PostgreSQL in {} (port {}); it is removed at the end", t.dir.display(), t.port);
                            let url = t.url();
                            throwaway = Some(t);
                            url
                        }
                        Err(why) => {
                            eprintln!("error: no PostgreSQL server to run the demo on: nothing answers at 127.0.0.1:5432, DATABASE_URL is not set, and {why}.\nInstall PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql@15`), or point DATABASE_URL at a server where you may create a database.");
                            return Exit::StepFailed;
                        }
                    }
                }
            }
        };
        let code = match demo(g, &server, fresh, leads, throwaway.is_some()).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit()
            }
        };
        drop(throwaway);
        code
    })
}

async fn demo(
    g: &Global,
    server: &str,
    fresh: bool,
    leads: u32,
    throwaway: bool,
) -> Result<Exit, exec::Error> {
    let started = Instant::now();
    let server = db::Target::parse(server)?;
    let admin = db::connect(&server).await?;
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&DEMO_DB],
        )
        .await
        .map_err(db::Error::from)?
        .get(0);
    if exists && fresh {
        eprintln!("pgshift demo: dropping database {DEMO_DB} (--fresh)");
        admin
            .batch_execute(&format!("DROP DATABASE {DEMO_DB} WITH (FORCE)"))
            .await
            .map_err(db::Error::from)?;
    }
    if !exists || fresh {
        admin
            .batch_execute(&format!("CREATE DATABASE {DEMO_DB}"))
            .await
            .map_err(db::Error::from)?;
        eprintln!("pgshift demo: created database {DEMO_DB}");
    } else {
        eprintln!("pgshift demo: reusing database {DEMO_DB} (pass --fresh to start over)");
    }
    drop(admin);
    let target = server.with_dbname(DEMO_DB);
    let files = write_plans()?;
    let cx = crate::cli::context(
        g,
        target.clone(),
        exec::Options {
            auto_gates: true,
            yes: true,
            ..Default::default()
        },
    )?;
    crate::cli::install_signals(cx.cancel.clone(), cx.reporter.clone());

    // 1. The v0 schema.
    let p1 = load(&files[0])?;
    eprintln!(
        "pgshift demo: step 1/3: applying {} (the Clarivum v0 schema)",
        p1.id
    );
    runner::run(&cx, &p1, runner::Mode::Apply).await?;

    // 2. Fixtures, once.
    let c = db::connect(&target).await?;
    let have: i64 = c
        .query_one("SELECT count(*) FROM leads", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    if have == 0 {
        eprintln!("pgshift demo: step 2/3: loading fixtures ({leads} leads, deterministic)");
        let t = Instant::now();
        c.execute(
            "SELECT set_config('clarivum.fixture_leads', $1, false)",
            &[&leads.to_string()],
        )
        .await
        .map_err(db::Error::from)?;
        c.batch_execute(FIXTURES).await.map_err(db::Error::from)?;
        eprintln!(
            "pgshift demo: fixtures loaded in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    } else {
        eprintln!("pgshift demo: step 2/3: fixtures already loaded ({have} leads)");
    }

    // 3. The hashed-email migration, all four phases.
    let p2 = load(&files[1])?;
    eprintln!(
        "pgshift demo: step 3/3: applying {} (expand, dual-write, backfill, contract); its gate is passed on your behalf",
        p2.id
    );
    let t = Instant::now();
    runner::run(&cx, &p2, runner::Mode::Apply).await?;
    let took = t.elapsed();

    let hashed: i64 = c.query_one("SELECT count(*) FROM leads WHERE email_hash = encode(sha256(lower(email)::bytea), 'hex')", &[]).await.map_err(db::Error::from)?.get(0);
    let total: i64 = c
        .query_one("SELECT count(*) FROM leads", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    let steps = cx.control.steps(&c, &p2.id).await?;
    let backfilled: i64 = steps
        .iter()
        .filter(|s| s.kind == "backfill")
        .map(|s| s.rows_done)
        .sum();
    let retries: i64 = c
        .query_one(
            &cx.control.sql(
                "SELECT count(*) FROM __SCHEMA__.events WHERE plan_id = $1 AND event = 'retry'",
            ),
            &[&p2.id],
        )
        .await
        .map_err(db::Error::from)?
        .get(0);

    println!();
    crate::cli::print_status(&cx, Some(&p2.id)).await?;
    println!();
    println!("summary:");
    println!(
        "  1. {} and {} applied to database {DEMO_DB} on {}",
        p1.id, p2.id, server.display
    );
    println!(
        "  2. {hashed} of {total} leads carry the right email_hash; the backfill updated {backfilled} rows in {:.1}s, with {retries} lock retries",
        took.as_secs_f64()
    );
    if throwaway {
        println!(
            "  3. the throwaway server goes away now; run the demo with a server of your own to keep the result and explore it with `pgshift status` ({:.1}s in all)",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "  3. look closer with `pgshift status --events --database-url {} {}`; the walkthrough in README.md explains each step ({:.1}s in all)",
            target.display,
            p2.id,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Exit::Ok)
}

fn load(path: &Path) -> Result<plan::Plan, exec::Error> {
    plan::load(path).map_err(|e| {
        exec::Error::Usage(format!("bundled plan {} is invalid:\n{e}", path.display()))
    })
}

/// Writes the bundled plans to a stable directory, so that `resume` by id finds them.
fn write_plans() -> Result<Vec<PathBuf>, exec::Error> {
    let dir = std::env::temp_dir().join("pgshift-demo");
    std::fs::create_dir_all(&dir)
        .map_err(|e| exec::Error::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for (name, text) in [
        ("0001_core_schema.yaml", PLAN_0001),
        ("0002_leads_email_hash.yaml", PLAN_0002),
    ] {
        let p = dir.join(name);
        // Write beside and rename: a second demo running at the same time never reads a half-written plan.
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| exec::Error::Usage(format!("cannot write {}: {e}", p.display())))?;
        out.push(p);
    }
    Ok(out)
}

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
struct Throwaway {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    as_user: Option<String>,
}

impl Throwaway {
    fn start() -> Result<Throwaway, String> {
        let bin = find_server_bin()
            .ok_or("no PostgreSQL server binaries (initdb, pg_ctl) are installed")?;
        let is_root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|u| u.split_whitespace().next() == Some("0"))
            })
            .unwrap_or(false);
        // initdb refuses to run as root: use the `postgres` account when there is one.
        let as_user = is_root.then(|| "postgres".to_string());
        let dir = std::env::temp_dir().join(format!("pgshift-demo-cluster-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Some(u) = &as_user {
            let ok = Command::new("chown")
                .arg("-R")
                .arg(u)
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!(
                    "running as root, and cannot hand {} to the `{u}` user",
                    dir.display()
                ));
            }
        }
        let port = free_port().ok_or("no free local port for a throwaway server")?;
        let t = Throwaway {
            dir,
            port,
            bin,
            as_user,
        };
        let data = t.dir.join("data");
        t.cmd(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            t.port,
            path_str(&t.dir)
        );
        t.cmd(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-o",
                &opts,
                "-l",
                path_str(&t.dir.join("server.log")),
                "-w",
                "start",
            ],
        )?;
        Ok(t)
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn cmd(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let out = match &self.as_user {
            Some(u) => Command::new("runuser")
                .arg("-u")
                .arg(u)
                .arg("--")
                .arg(&exe)
                .args(args)
                .output(),
            None => Command::new(&exe).args(args).output(),
        }
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.cmd(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "fast", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn find_server_bin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.reverse();
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn free_port() -> Option<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    let port = l.local_addr().ok()?.port();
    drop(l);
    std::thread::sleep(Duration::from_millis(10));
    Some(port)
}
