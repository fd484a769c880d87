//! The next command to run, as pgshift prints it: with the options of this run
//! that the next one needs (`--control-schema`, `--database-url`), so that a
//! hint copied at 3 a.m. looks in the same database and the same schema.
//!
//! A URL given with `--database-url` is repeated when it carries no password;
//! one with a password never is: the hint then ends with a shell comment that
//! says to pass the same URL. A URL from `DATABASE_URL` needs nothing: the
//! next command, in the same shell, reads it too.

use std::sync::OnceLock;

use super::Global;
use crate::db;

#[derive(Debug, Clone)]
struct Opts {
    program: String,
    /// `--control-schema S`, when not the default.
    schema: Option<String>,
    url: Url,
}

#[derive(Debug, Clone)]
enum Url {
    /// From the environment, or the default: the next command finds it the same way.
    Implicit,
    /// Given on the command line, without a password: repeated as it is.
    Shown(String),
    /// Given on the command line, with a password: never printed.
    Secret,
}

static OPTS: OnceLock<Opts> = OnceLock::new();

/// Records this run's options (once, at start-up).
pub fn init(g: &Global) {
    let env = std::env::var("DATABASE_URL").ok();
    let url = match &g.database_url {
        Some(u) if env.as_deref() != Some(u.as_str()) => {
            if db::redact(u) == *u {
                Url::Shown(u.clone())
            } else {
                Url::Secret
            }
        }
        _ => Url::Implicit,
    };
    let _ = OPTS.set(Opts {
        program: "pgshift".into(),
        schema: (g.control_schema != "pgshift").then(|| g.control_schema.clone()),
        url,
    });
}

static PROGRAM: OnceLock<String> = OnceLock::new();

/// Hints name the program as `program` (the demo: the path it runs from, when
/// `pgshift` is not on the PATH).
pub fn set_program(program: &str) {
    let _ = PROGRAM.set(program.to_string());
}

fn opts() -> Opts {
    let mut o = OPTS.get().cloned().unwrap_or(Opts {
        program: "pgshift".into(),
        schema: None,
        url: Url::Implicit,
    });
    if let Some(p) = PROGRAM.get() {
        o.program = p.clone();
    }
    o
}

/// `pgshift ARGS [--control-schema S] [--database-url URL]`, ready to paste.
pub fn command(args: &str) -> String {
    render(&opts(), args)
}

fn render(o: &Opts, args: &str) -> String {
    let mut s = format!("{} {args}", o.program);
    if let Some(schema) = &o.schema {
        s.push_str(&format!(" --control-schema {}", shell_quote(schema)));
    }
    match &o.url {
        Url::Implicit => {}
        Url::Shown(u) => s.push_str(&format!(" --database-url {}", shell_quote(u))),
        Url::Secret => s.push_str("  # with the same --database-url as this run"),
    }
    s
}

/// `word` as one shell word: as it is when it is plain, else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(schema: Option<&str>, url: Url) -> Opts {
        Opts {
            program: "pgshift".into(),
            schema: schema.map(str::to_string),
            url,
        }
    }

    #[test]
    fn hints_carry_the_schema_and_a_url_without_password() {
        let o = opts(
            Some("ops"),
            Url::Shown("postgres://app@db:5432/rehearsal?sslmode=require".into()),
        );
        assert_eq!(
            render(&o, "status p"),
            "pgshift status p --control-schema ops --database-url 'postgres://app@db:5432/rehearsal?sslmode=require'"
        );
    }

    #[test]
    fn a_url_with_a_password_is_never_repeated() {
        let o = opts(None, Url::Secret);
        let s = render(&o, "resume p");
        assert_eq!(
            s,
            "pgshift resume p  # with the same --database-url as this run"
        );
    }

    #[test]
    fn the_environment_needs_nothing() {
        assert_eq!(
            render(&opts(None, Url::Implicit), "resume p"),
            "pgshift resume p"
        );
    }

    #[test]
    fn odd_words_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("plain_name"), "plain_name");
        assert_eq!(shell_quote("two words"), "'two words'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
