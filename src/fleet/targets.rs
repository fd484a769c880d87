//! The targets file of `pgshift fleet`: which databases (or tenant schemas) one
//! plan runs on, how many at once, how many first, and when to stop starting.
//!
//! Read through the plan's positioned YAML tree (`plan::raw`) and checked the
//! way a plan is: every mistake in the file at once, each with `file:line:col`,
//! and nothing touched. Passwords never belong in this file (it is committed,
//! reviewed, pasted into tickets): a URL in it that carries one is an error, and
//! secrets come from the environment through `url_env`. Resolving those
//! variables ([`Targets::resolve`]) is part of the same check, so a missing
//! variable stops the fleet before any target starts, pointing at its line.
//! Pure: no database is reached here (discovery is `run.rs`'s job).

use std::path::{Path, PathBuf};

use crate::db;
use crate::plan::raw::{self, Node, Value};
use crate::plan::read::Reader;
use crate::plan::{self, Pos};

/// Targets running at once when neither the file nor `--parallel` says.
pub const DEFAULT_PARALLEL: u32 = 4;
/// Targets run first, alone, when neither the file nor `--canary` says.
pub const DEFAULT_CANARY: u32 = 1;
/// Failed targets after which no new target starts, when the file does not say.
pub const DEFAULT_MAX_FAILURES: u32 = 1;
/// More at once than this is a typo, or a connection storm on a shared server.
pub const MAX_PARALLEL: u32 = 256;

const TOP_KEYS: [&str; 5] = ["parallel", "canary", "max_failures", "targets", "discover"];
const TARGET_KEYS: [&str; 4] = ["name", "url", "url_env", "schema"];
const DISCOVER_KEYS: [&str; 4] = ["url", "url_env", "query", "mode"];

/// A validated targets file.
#[derive(Debug, Clone)]
pub struct Targets {
    pub file: PathBuf,
    pub parallel: u32,
    pub canary: u32,
    pub max_failures: u32,
    /// Listed targets, in file order (they come before discovered ones).
    pub targets: Vec<Entry>,
    /// Queries that find more targets (one per server or database they search).
    pub discover: Vec<Discover>,
}

/// One listed target.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub url: Url,
    /// Schema-per-tenant: run with `search_path` set to this schema.
    pub schema: Option<String>,
    pub pos: Pos,
}

/// Where a connection URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Url {
    /// Written in the file (without a password: checked).
    Literal { url: String, pos: Pos },
    /// The value of an environment variable.
    Env { var: String, pos: Pos },
}

/// More targets from a query on an admin connection.
#[derive(Debug, Clone)]
pub struct Discover {
    pub url: Url,
    /// Returns one text column: database names, or schema names.
    pub query: String,
    pub mode: Mode,
    pub pos: Pos,
}

/// What each row of a discover query names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A database on the admin connection's server (database per tenant).
    Databases,
    /// A schema in the admin connection's database (schema per tenant).
    Schemas,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Databases => "databases",
            Mode::Schemas => "schemas",
        }
    }
}

/// A listed target with its URL read and parsed.
#[derive(Debug, Clone)]
pub struct ResolvedEntry {
    pub name: String,
    pub target: db::Target,
    pub schema: Option<String>,
}

/// The file's connections, read from the file and the environment.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub targets: Vec<ResolvedEntry>,
    pub discover: Vec<(Discover, db::Target)>,
}

/// Reads and validates a targets file. Touches no database.
pub fn load(path: &Path) -> Result<Targets, plan::Error> {
    let text = plan::read(path)?;
    parse(path, &text)
}

/// Validates the text of a targets file read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Targets, plan::Error> {
    let mut v = Checker(Reader::new(path.to_path_buf()));
    let root = match raw::parse(text) {
        Ok(n) => n,
        Err(e) => {
            v.error(e.pos, "syntax", e.message, None);
            return Err(v.into_error());
        }
    };
    let t = v.file(&root);
    match t {
        Some(t) if v.diags.is_empty() => Ok(t),
        _ => Err(v.into_error()),
    }
}

impl Targets {
    /// Reads each `url_env` from `env` and parses every URL; every problem is a
    /// diagnostic at the line that names the URL or the variable. Touches no database.
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Resolved, plan::Error> {
        let mut v = Checker(Reader::new(self.file.clone()));
        let mut targets = Vec::new();
        for e in &self.targets {
            if let Some(target) = v.url(&e.url, &format!("target `{}`", e.name), &env) {
                targets.push(ResolvedEntry {
                    name: e.name.clone(),
                    target,
                    schema: e.schema.clone(),
                });
            }
        }
        let discover = self
            .discover
            .iter()
            .filter_map(|d| v.url(&d.url, "discover", &env).map(|t| (d.clone(), t)))
            .collect();
        if !v.diags.is_empty() {
            return Err(v.into_error());
        }
        Ok(Resolved { targets, discover })
    }
}

/// True for a name a person can type and grep for: letters, digits, `_`, `-`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn valid_env_var(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The plan's reader (positioned diagnostics, keys checked with suggestions),
/// with what only the targets file needs.
struct Checker(Reader);

impl std::ops::Deref for Checker {
    type Target = Reader;
    fn deref(&self) -> &Reader {
        &self.0
    }
}

impl std::ops::DerefMut for Checker {
    fn deref_mut(&mut self) -> &mut Reader {
        &mut self.0
    }
}

impl Checker {
    fn into_error(self) -> plan::Error {
        let mut diags = self.0.diags;
        diags.sort_by_key(|d| d.pos);
        plan::Error::Invalid {
            file: self.0.file,
            diagnostics: diags,
        }
    }

    /// A count from `min` to `max`.
    fn count(&mut self, node: &Node, what: &str, min: i64, max: i64) -> Option<u32> {
        self.integer(node, what, min, max).map(|n| n as u32)
    }

    fn file(&mut self, root: &Node) -> Option<Targets> {
        let mut t = Targets {
            file: self.file.clone(),
            parallel: DEFAULT_PARALLEL,
            canary: DEFAULT_CANARY,
            max_failures: DEFAULT_MAX_FAILURES,
            targets: Vec::new(),
            discover: Vec::new(),
        };
        let mut listed = false;
        for (key, _, val) in self.entries(root, "the targets file", &TOP_KEYS) {
            match key.as_str() {
                "parallel" => {
                    if let Some(n) = self.count(val, "`parallel`", 1, MAX_PARALLEL as i64) {
                        t.parallel = n;
                    }
                }
                "canary" => {
                    if let Some(n) = self.count(val, "`canary`", 0, 1_000_000) {
                        t.canary = n;
                    }
                }
                "max_failures" => {
                    if let Some(n) = self.count(val, "`max_failures`", 1, 1_000_000) {
                        t.max_failures = n;
                    }
                }
                "targets" => {
                    listed = true;
                    t.targets = self.targets(val);
                }
                // One query, or a list of them (a server each).
                "discover" => match &val.value {
                    Value::Seq(items) => {
                        t.discover = items.iter().filter_map(|d| self.discover(d)).collect()
                    }
                    _ => t.discover = self.discover(val).into_iter().collect(),
                },
                _ => {}
            }
        }
        if matches!(root.value, Value::Map(_))
            && t.targets.is_empty()
            && t.discover.is_empty()
            && !listed
            && !self
                .diags
                .iter()
                .any(|d| d.rule == "unknown-key" || d.rule == "type")
        {
            self.error(
                root.pos,
                "no-targets",
                "the file names no target",
                Some(
                    "list them under `targets:` (name and url or url_env), or find them with `discover:` (url_env and query)".into(),
                ),
            );
        }
        Some(t)
    }

    fn targets(&mut self, node: &Node) -> Vec<Entry> {
        let Value::Seq(items) = &node.value else {
            self.error(
                node.pos,
                "type",
                format!(
                    "`targets` must be a list of targets, not {}",
                    node.value.describe()
                ),
                Some("write `targets:` then one `- name: …` item per target".into()),
            );
            return Vec::new();
        };
        let mut out: Vec<Entry> = Vec::new();
        let mut seen: Vec<(String, Pos)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let what = format!("target {} of `targets`", i + 1);
            let entries = self.entries(item, &what, &TARGET_KEYS);
            let mut name = None;
            let mut url = None;
            let mut url_env = None;
            let mut schema = None;
            let mut bad = !matches!(item.value, Value::Map(_));
            for (key, k, val) in entries {
                match key.as_str() {
                    "name" => {
                        name = self.string(val, "`name`").map(|n| (n, val.pos));
                        bad |= name.is_none();
                    }
                    "url" => {
                        url = Some((k.pos, val));
                    }
                    "url_env" => {
                        url_env = Some((k.pos, val));
                    }
                    "schema" => {
                        schema = self.string(val, "`schema`");
                        bad |= schema.is_none();
                    }
                    _ => {}
                }
            }
            let label = name
                .as_ref()
                .map(|(n, _)| format!("target `{n}`"))
                .unwrap_or(what.clone());
            if let Some((n, pos)) = &name {
                if !valid_name(n) {
                    self.error(
                        *pos,
                        "name",
                        format!("target name `{n}` is not a plain name"),
                        Some("use letters, digits, `_`, `-` and `.` (at most 63): it names the target in every message".into()),
                    );
                    bad = true;
                } else if let Some((_, first)) = seen.iter().find(|(s, _)| s == n) {
                    self.error(
                        *pos,
                        "duplicate-name",
                        format!(
                            "target name `{n}` is used twice (first at line {})",
                            first.line
                        ),
                        Some("every target needs a name of its own".into()),
                    );
                    bad = true;
                }
                seen.push((n.clone(), *pos));
            } else if matches!(item.value, Value::Map(_)) && !bad {
                self.error(
                    item.pos,
                    "missing-key",
                    format!("{what} has no `name`"),
                    Some("every target needs a name: it is how messages and `fleet status` refer to it".into()),
                );
                bad = true;
            }
            let url = self.url_choice(item, &label, url, url_env);
            bad |= url.is_none();
            if let (false, Some((name, _)), Some(url)) = (bad, name, url) {
                out.push(Entry {
                    name,
                    url,
                    schema,
                    pos: item.pos,
                });
            }
        }
        out
    }

    /// Exactly one of `url` and `url_env`, each checked.
    fn url_choice(
        &mut self,
        item: &Node,
        label: &str,
        url: Option<(Pos, &Node)>,
        url_env: Option<(Pos, &Node)>,
    ) -> Option<Url> {
        match (url, url_env) {
            (Some((_, u)), None) => {
                let text = self.string(u, "`url`")?;
                if db::redact(&text) != text {
                    self.error(
                        u.pos,
                        "password-in-file",
                        format!(
                            "{label}: the URL carries a password ({}); passwords never go in the targets file",
                            db::redact(&text)
                        ),
                        Some("put the whole URL in an environment variable and name it with `url_env:` instead".into()),
                    );
                    return None;
                }
                if let Err(e) = db::Target::parse(&text) {
                    self.error(u.pos, "url", format!("{label}: {e}"), None);
                    return None;
                }
                Some(Url::Literal {
                    url: text,
                    pos: u.pos,
                })
            }
            (None, Some((_, e))) => {
                let var = self.string(e, "`url_env`")?;
                if !valid_env_var(&var) {
                    self.error(
                        e.pos,
                        "env",
                        format!("{label}: `{var}` is not an environment variable name"),
                        Some("`url_env` names the variable that holds the URL, like `EU_1_DATABASE_URL`; the URL itself goes in that variable".into()),
                    );
                    return None;
                }
                Some(Url::Env { var, pos: e.pos })
            }
            (Some((a, _)), Some((b, _))) => {
                self.error(
                    a.max(b),
                    "url",
                    format!("{label} has both `url` and `url_env`"),
                    Some("keep one: `url_env` when the URL needs a password".into()),
                );
                None
            }
            (None, None) => {
                if matches!(item.value, Value::Map(_)) {
                    self.error(
                        item.pos,
                        "missing-key",
                        format!("{label} has no `url` or `url_env`"),
                        Some(
                            "`url_env: VAR` reads the URL from the environment variable VAR".into(),
                        ),
                    );
                }
                None
            }
        }
    }

    fn discover(&mut self, node: &Node) -> Option<Discover> {
        let entries = self.entries(node, "`discover`", &DISCOVER_KEYS);
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        let mut url = None;
        let mut url_env = None;
        let mut query = None;
        let mut mode = Some(Mode::Databases);
        let mut query_given = false;
        for (key, k, val) in entries {
            match key.as_str() {
                "url" => url = Some((k.pos, val)),
                "url_env" => url_env = Some((k.pos, val)),
                "query" => {
                    query_given = true;
                    query = self.string(val, "`discover.query`");
                }
                "mode" => {
                    mode = match &val.value {
                        Value::Str(s) if s == "databases" => Some(Mode::Databases),
                        Value::Str(s) if s == "schemas" => Some(Mode::Schemas),
                        other => {
                            let got = match other {
                                Value::Str(s) => format!("`{s}`"),
                                o => o.describe().to_string(),
                            };
                            self.error(
                                val.pos,
                                "value",
                                format!("`discover.mode` is {got}; it is `databases` or `schemas`"),
                                Some("`databases`: each row is a database on the admin connection's server; `schemas`: each row is a schema in its database, run with search_path set to it".into()),
                            );
                            None
                        }
                    }
                }
                _ => {}
            }
        }
        if !query_given {
            self.error(
                node.pos,
                "missing-key",
                "`discover` has no `query`",
                Some("a query returning one text column: `SELECT datname FROM pg_database WHERE datname LIKE 'tenant%'`".into()),
            );
        }
        let url = self.url_choice(node, "discover", url, url_env);
        Some(Discover {
            url: url?,
            query: query?,
            mode: mode?,
            pos: node.pos,
        })
    }

    /// The URL a target connects to, read from the environment when it comes from there.
    fn url(
        &mut self,
        url: &Url,
        label: &str,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Option<db::Target> {
        let (text, pos, from) = match url {
            Url::Literal { url, pos } => (url.clone(), *pos, String::new()),
            Url::Env { var, pos } => match env(var) {
                Some(v) if !v.trim().is_empty() => (v, *pos, format!(" (from `{var}`)")),
                _ => {
                    self.error(
                        *pos,
                        "env",
                        format!("{label}: environment variable `{var}` is not set"),
                        Some(format!(
                            "export {var}=postgres://user:password@host:5432/db before running pgshift"
                        )),
                    );
                    return None;
                }
            },
        };
        match db::Target::parse(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(pos, "url", format!("{label}{from}: {e}"), None);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Targets, Vec<String>> {
        parse(Path::new("targets.yaml"), text).map_err(|e| {
            e.diagnostics()
                .iter()
                .map(|d| format!("{} {} {}", d.pos, d.rule, d.message))
                .collect()
        })
    }

    #[test]
    fn the_product_example_parses() {
        let t = check(
            "parallel: 8\ncanary: 1\nmax_failures: 2\ntargets:\n  - name: eu_1\n    url_env: EU_1_DATABASE_URL\n  - name: us_1\n    url: postgres://migrator@us-1.internal:5432/app?sslmode=verify-full\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: SELECT datname FROM pg_database WHERE datname LIKE 'tenant_%'\n",
        )
        .unwrap();
        assert_eq!((t.parallel, t.canary, t.max_failures), (8, 1, 2));
        assert_eq!(t.targets.len(), 2);
        assert_eq!(t.targets[0].name, "eu_1");
        assert!(matches!(&t.targets[0].url, Url::Env { var, .. } if var == "EU_1_DATABASE_URL"));
        assert_eq!(t.discover.len(), 1);
        assert_eq!(t.discover[0].mode, Mode::Databases);
    }

    #[test]
    fn defaults_apply_when_the_file_is_silent() {
        let t = check("targets:\n  - { name: a, url: 'postgres://u@h/db' }\n").unwrap();
        assert_eq!(
            (t.parallel, t.canary, t.max_failures),
            (DEFAULT_PARALLEL, DEFAULT_CANARY, DEFAULT_MAX_FAILURES)
        );
    }

    #[test]
    fn every_mistake_is_reported_at_its_line_and_column() {
        let errs = check(
            "paralel: 8\ncanary: -1\ntargets:\n  - name: a\n    url: postgres://u:hunter2@h/db\n  - name: a\n    url_env: X\n  - name: b\n  - name: c\n    url: postgres://u@h/db\n    url_env: C_URL\ndiscover:\n  url_env: 1BAD\n  mode: tenants\n",
        )
        .unwrap_err();
        let all = errs.join("\n");
        assert!(
            all.contains("1:1 unknown-key unknown key `paralel`"),
            "{all}"
        );
        assert!(all.contains("2:9 range"), "{all}");
        assert!(all.contains("5:10 password-in-file"), "{all}");
        assert!(!all.contains("hunter2"), "a password leaked: {all}");
        assert!(all.contains("6:11 duplicate-name"), "{all}");
        assert!(
            all.contains("8:5 missing-key target `b` has no `url`"),
            "{all}"
        );
        assert!(all.contains("both `url` and `url_env`"), "{all}");
        assert!(all.contains("13:12 env"), "{all}");
        assert!(all.contains("14:9 value"), "{all}");
        assert!(all.contains("`discover` has no `query`"), "{all}");
    }

    #[test]
    fn an_empty_file_and_a_syntax_error_are_errors() {
        let errs = check("parallel: 2\n").unwrap_err();
        assert!(errs[0].contains("no-targets"), "{errs:?}");
        let errs = check("targets: [\n").unwrap_err();
        assert!(errs[0].contains("syntax"), "{errs:?}");
    }

    #[test]
    fn unset_environment_variables_point_at_their_line() {
        let t =
            check("targets:\n  - name: a\n    url_env: A_URL\n  - name: b\n    url_env: B_URL\n")
                .unwrap();
        let err = t
            .resolve(|v| (v == "A_URL").then(|| "postgres://u:pw@h/db".to_string()))
            .unwrap_err();
        let d = err.diagnostics();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].pos, Pos { line: 5, col: 14 });
        assert!(d[0].message.contains("`B_URL` is not set"), "{}", d[0]);
        let ok = t
            .resolve(|_| Some("postgres://u:pw@h/db".to_string()))
            .unwrap();
        assert_eq!(ok.targets[1].target.display, "postgres://u:***@h/db");
    }

    #[test]
    fn schema_mode_is_read() {
        let t = check(
            "discover:\n  url: postgres://admin@h/app\n  query: SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%'\n  mode: schemas\n",
        )
        .unwrap();
        assert_eq!(t.discover[0].mode, Mode::Schemas);
    }

    #[test]
    fn discover_takes_a_list_of_queries() {
        let t = check(
            "discover:\n  - url_env: EU_ADMIN_URL\n    query: SELECT datname FROM pg_database WHERE datname LIKE 'tenant%'\n  - url_env: US_ADMIN_URL\n    query: SELECT datname FROM pg_database WHERE datname LIKE 'tenant%'\n",
        )
        .unwrap();
        assert_eq!(t.discover.len(), 2);
        let errs = check("discover:\n  - url_env: EU_ADMIN_URL\n  - 3\n").unwrap_err();
        assert!(
            errs.iter().any(|e| e.starts_with("2:5 missing-key")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.starts_with("3:5 type")), "{errs:?}");
    }
}
