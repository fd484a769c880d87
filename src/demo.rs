//! `pgshift demo`: the newcomer's first run, on the bundled Clarivum plans.
//!
//! It connects to the server of `DATABASE_URL` (else 127.0.0.1:5432), and there
//! creates (or with `--fresh` recreates) a database of its own, `pgshift_demo`:
//! the database named in the URL is only used to connect, and never changed.
//! It applies the v0 schema, loads the deterministic fixtures (saying what it
//! loads while it does), applies the hashed-email migration with its progress
//! bars (passing its gate on the operator's behalf, and saying so), then prints
//! `status` and a summary that says what ran this time. With no database URL
//! and no server at the default address it starts a throwaway PostgreSQL from
//! the installed server binaries in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cli::output::{Level, Line};
use crate::cli::{Global, connect, hint, report};
use crate::db::{self, OneTrip};
use crate::exec::{self, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan;

const PLAN_0001: &str = include_str!("../plans/clarivum/0001_core_schema.yaml");
const PLAN_0002: &str = include_str!("../plans/clarivum/0002_leads_email_hash.yaml");
const FIXTURES: &str = include_str!("../plans/clarivum/fixtures.sql");

fn say(text: impl Into<String>) {
    Line::plain(
        Level::Info,
        "demo",
        format!("pgshift demo: {}", text.into()),
    )
    .emit();
}

/// Runs the demo; returns the exit code.
pub fn run(g: &Global, fresh: bool, leads: u32, database: &str) -> Exit {
    hint::set_program(&runnable_program());
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let (server, throwaway) = match server(g).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        let run = Run {
            fresh,
            leads,
            database,
            throwaway: throwaway.is_some(),
        };
        let code = match demo(g, &server, &run).await {
            Ok(code) => code,
            Err(e) => {
                Line::error("error", e.to_string()).emit();
                e.exit()
            }
        };
        drop(throwaway);
        code
    })
}

/// The server to run on: `DATABASE_URL`'s, the default one, or a throwaway one.
async fn server(g: &Global) -> Result<(db::Target, Option<Throwaway>), Exit> {
    if let Some(url) = &g.database_url {
        let target = db::Target::parse(url).map_err(|e| {
            Line::error("invalid_url", e.to_string()).emit();
            Exit::Invalid
        })?;
        connect::probe(&target).await?;
        return Ok((target, None));
    }
    let default = db::Target::parse(db::DEFAULT_URL).expect("the default URL parses");
    if db::connect(&default).await.is_ok() {
        return Ok((default, None));
    }
    match Throwaway::start() {
        Ok(t) => {
            say(format!(
                "no server answers at 127.0.0.1:5432 and DATABASE_URL is not set; started a throwaway PostgreSQL in {} (port {}); it is removed at the end",
                t.dir.display(),
                t.port
            ));
            let target = db::Target::parse(&t.url()).expect("the throwaway URL parses");
            Ok((target, Some(t)))
        }
        Err(why) => {
            Line::error("no_server", format!("no PostgreSQL server to run the demo on: nothing answers at 127.0.0.1:5432, DATABASE_URL is not set, and {why}.\nInstall PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql@15`), or point DATABASE_URL at a server where you may create a database.")).emit();
            Err(Exit::StepFailed)
        }
    }
}

/// How the demo's hints name pgshift: `pgshift` when that is the binary running
/// now, else the path it runs from (`cargo run` leaves nothing on the PATH).
fn runnable_program() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "pgshift".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .filter_map(|d| std::fs::canonicalize(d.join("pgshift")).ok())
            .next()
            .is_some_and(|found| found == exe)
    });
    if on_path {
        return "pgshift".into();
    }
    let cwd = std::env::current_dir()
        .ok()
        .and_then(|d| std::fs::canonicalize(d).ok());
    match cwd.and_then(|d| exe.strip_prefix(&d).ok().map(Path::to_path_buf)) {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

/// What the operator asked of the demo.
struct Run<'a> {
    fresh: bool,
    leads: u32,
    database: &'a str,
    throwaway: bool,
}

async fn demo(g: &Global, server: &db::Target, run: &Run<'_>) -> Result<Exit, exec::Error> {
    let started = Instant::now();
    let target = prepare_database(server, run.database, run.fresh).await?;
    crate::cli::output::set_target(&target.display);
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

    // 1. The v0 schema.
    let p1 = load(&files[0])?;
    say(format!(
        "step 1/3: applying {} (the Clarivum v0 schema)",
        p1.id
    ));
    runner::run(&cx, &p1, runner::Mode::Apply).await?;

    // 2. Fixtures, once.
    let c = db::connect(&target).await?;
    load_fixtures(&c, run.leads).await?;

    // 3. The hashed-email migration, all four phases.
    let p2 = load(&files[1])?;
    say(format!(
        "step 3/3: applying {} (expand, dual-write, backfill, contract); its gate is passed on your behalf",
        p2.id
    ));
    let before = report::steps_started();
    runner::run(&cx, &p2, runner::Mode::Apply).await?;
    let ran = report::steps_started() > before;

    println!();
    crate::cli::print_status(&cx, Some(&p2.id)).await?;
    println!();
    summary(&cx, &c, (&p1, &p2), ran, run.database).await?;
    if run.throwaway {
        println!(
            "  4. the throwaway server goes away now; run the demo with a server of your own to keep the result and explore it with `pgshift status` ({:.1}s in all)",
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "  4. look closer with:\n       {}\n     the walkthrough in README.md explains each step ({:.1}s in all)",
            demo_command(&target, run.database, &format!("status {} --events", p2.id)),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Exit::Ok)
}

/// Creates (or, with `--fresh`, recreates) the demo's own database on `server`.
async fn prepare_database(
    server: &db::Target,
    name: &str,
    fresh: bool,
) -> Result<db::Target, exec::Error> {
    let admin = db::connect(server).await?;
    let exists: bool = admin
        .row(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await
        .map_err(db::Error::from)?
        .get(0);
    let named = server.config.get_dbname().unwrap_or("postgres");
    let quoted = crate::ident::quote_ident(name);
    if exists && fresh {
        say(format!("dropping database {name} (--fresh)"));
        admin
            .batch_execute(&format!("DROP DATABASE {quoted} WITH (FORCE)"))
            .await
            .map_err(db::Error::from)?;
    }
    if !exists || fresh {
        admin
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
            .map_err(db::Error::from)?;
        say(format!(
            "created database {name} on {} (the database `{named}` of the URL is only used to connect)",
            server.display
        ));
    } else {
        say(format!(
            "reusing database {name} on {} (pass --fresh to start over)",
            server.display
        ));
    }
    Ok(server.with_dbname(name))
}

/// Loads the fixtures unless the leads are there already: the script's
/// statements in one transaction (all or nothing, as the script intends),
/// each announced, with a line every few seconds while a long one runs.
async fn load_fixtures(c: &tokio_postgres::Client, leads: u32) -> Result<(), exec::Error> {
    let have: i64 = c
        .row("SELECT count(*) FROM leads", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    if have > 0 {
        say(format!("step 2/3: fixtures already loaded ({have} leads)"));
        return Ok(());
    }
    say(format!(
        "step 2/3: loading fixtures ({leads} leads, deterministic), in one transaction"
    ));
    let t = Instant::now();
    c.exec(
        "SELECT set_config('clarivum.fixture_leads', $1, false)",
        &[&leads.to_string()],
    )
    .await
    .map_err(db::Error::from)?;
    let statements = plan::sql::split(FIXTURES)
        .map_err(|_| exec::Error::Usage("the bundled fixtures.sql does not parse".into()))?;
    c.batch_execute("BEGIN").await.map_err(db::Error::from)?;
    for (i, s) in statements.iter().enumerate() {
        let what = fixture_part(&s.text);
        say(format!(
            "fixtures {}/{}: {what} ({:.1}s so far)",
            i + 1,
            statements.len(),
            t.elapsed().as_secs_f64()
        ));
        let work = c.batch_execute(&s.text);
        tokio::pin!(work);
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
        );
        loop {
            tokio::select! {
                r = &mut work => { r.map_err(db::Error::from)?; break; }
                _ = ticks.tick() => say(format!("  still loading {what} ({:.0}s so far)", t.elapsed().as_secs_f64())),
            }
        }
    }
    c.batch_execute("COMMIT").await.map_err(db::Error::from)?;
    say(format!(
        "fixtures loaded in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What a statement of the fixtures script loads, in a word or two.
fn fixture_part(statement: &str) -> String {
    let flat = statement
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(i) = flat.find("INSERT INTO public.") {
        let rest = &flat[i + "INSERT INTO public.".len()..];
        let table: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return table;
    }
    if flat.trim_start().starts_with("ANALYZE") {
        return "statistics (ANALYZE)".into();
    }
    "helper function".into()
}

/// The closing summary: what the database holds now, and what ran this time.
async fn summary(
    cx: &exec::Context,
    c: &tokio_postgres::Client,
    (p1, p2): (&plan::Plan, &plan::Plan),
    ran: bool,
    database: &str,
) -> Result<(), exec::Error> {
    let hashed: i64 = c.row("SELECT count(*) FROM leads WHERE email_hash = encode(sha256(lower(email)::bytea), 'hex')", &[]).await.map_err(db::Error::from)?.get(0);
    let total: i64 = c
        .row("SELECT count(*) FROM leads", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    let steps = cx.control.steps(c, &p2.id).await?;
    let backfill = steps.iter().find(|s| s.kind == "backfill");
    let rows = backfill.map(|s| s.rows_done).unwrap_or(0);
    let secs = backfill.and_then(|s| s.duration_secs).unwrap_or(0.0);
    let retries: i64 = c
        .row(
            &cx.control.sql(
                "SELECT count(*) FROM __SCHEMA__.events WHERE plan_id = $1 AND event = 'retry'",
            ),
            &[&p2.id],
        )
        .await
        .map_err(db::Error::from)?
        .get(0);
    println!("summary:");
    println!(
        "  1. {} and {} are applied to database {database} on {}",
        p1.id, p2.id, cx.target.display
    );
    println!("  2. {hashed} of {total} leads carry the right email_hash");
    if ran {
        println!(
            "  3. this run: the backfill went through {rows} rows in {:.1}s, with {retries} lock retries",
            secs
        );
    } else {
        println!(
            "  3. nothing ran this time: {} had already succeeded here (its backfill went through {rows} rows then); `--fresh` starts over",
            p2.id
        );
    }
    Ok(())
}

/// A pgshift command on the demo database, as it can be run from here.
fn demo_command(target: &db::Target, database: &str, args: &str) -> String {
    let program = hint::command("");
    let program = program.split_whitespace().next().unwrap_or("pgshift");
    if target.display.contains("***") {
        format!("{program} {args}  # with DATABASE_URL's server and password, database {database}")
    } else {
        format!(
            "{program} {args} --database-url {}",
            hint::shell_quote(&target.display)
        )
    }
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
