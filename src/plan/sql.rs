//! Splitting an `sql` body into statements and classifying each one by parsing it.
//!
//! Whether a step runs inside a transaction is derived here from the syntax
//! tree (squawk's parser), never guessed from the text: `CREATE INDEX
//! CONCURRENTLY`, `DROP INDEX CONCURRENTLY`, `REINDEX … CONCURRENTLY`,
//! `DETACH PARTITION … CONCURRENTLY`, `VACUUM`, `CREATE/DROP DATABASE`,
//! `ALTER SYSTEM` and tablespace DDL cannot run in a transaction block.

use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind, SyntaxNode};

/// One statement of a body, with its byte offset inside the body text.
#[derive(Debug, Clone)]
pub struct Statement {
    pub text: String,
    pub offset: usize,
    pub pos: super::Pos,
    /// The parser's name for the statement (`ALTER_TABLE`, `CREATE_INDEX`, …).
    pub kind: String,
    /// Why the statement cannot run inside a transaction, if it cannot.
    pub non_transactional: Option<&'static str>,
    /// `BEGIN`, `COMMIT`, `SAVEPOINT`, …: pgshift owns transactions, plans may not.
    pub transaction_control: bool,
}

/// A parse error at a byte offset of the body.
#[derive(Debug, Clone)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

/// Splits `text` into statements. Positions are filled in by the caller.
pub fn split(text: &str) -> Result<Vec<Statement>, Vec<ParseError>> {
    let parse = SourceFile::parse(text);
    let errors = parse.errors();
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| ParseError {
                offset: usize::from(e.range().start()),
                message: humanize(e.message()),
            })
            .collect());
    }
    Ok(parse
        .tree()
        .stmts()
        .map(|stmt| {
            let node = stmt.syntax();
            let range = node.text_range();
            Statement {
                text: text[range].trim().to_string(),
                offset: usize::from(range.start()),
                pos: super::Pos::default(),
                kind: format!("{:?}", node.kind()),
                non_transactional: non_transactional(node),
                transaction_control: is_transaction_control(node.kind()),
            }
        })
        .collect())
}

/// Checks that `expr` parses as one SQL expression.
pub fn check_expression(expr: &str) -> Result<(), String> {
    check_query(&format!("SELECT {expr}"), 7)
}

/// Checks that `query` parses as exactly one statement.
pub fn check_single_query(query: &str) -> Result<(), String> {
    check_query(query, 0)
}

/// Checks that `query` parses as exactly one statement; on error, the byte offset
/// inside `query` where it goes wrong, so the caller can point at the file column.
pub fn check_single_query_at(query: &str) -> Result<(), ParseError> {
    check_query_at(query, 0)
}

/// Like [`check_expression`], with the byte offset inside `expr` of the error.
pub fn check_expression_at(expr: &str) -> Result<(), ParseError> {
    check_query_at(&format!("SELECT {expr}"), 7)
}

fn check_query(text: &str, prefix: usize) -> Result<(), String> {
    check_query_at(text, prefix)
        .map_err(|e| format!("{} (at character {})", e.message, e.offset + 1))
}

fn check_query_at(text: &str, prefix: usize) -> Result<(), ParseError> {
    let parse = SourceFile::parse(text);
    if let Some(e) = parse.errors().first() {
        let at = usize::from(e.range().start()).saturating_sub(prefix);
        return Err(ParseError {
            offset: at,
            message: humanize(e.message()),
        });
    }
    let n = parse.tree().stmts().count();
    if n != 1 {
        return Err(ParseError {
            offset: 0,
            message: format!("expected exactly one SQL statement or expression, found {n}"),
        });
    }
    Ok(())
}

/// The parser's message with its token names turned into what a person typed:
/// `expected R_PAREN` becomes ``expected `)` ``, `found ALTER_KW` becomes ``found `ALTER` ``.
pub fn humanize(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            let (core, tail) = match word.strip_suffix(',') {
                Some(c) => (c, ","),
                None => (word, ""),
            };
            let human = match core {
                "R_PAREN" => "`)`".to_string(),
                "L_PAREN" => "`(`".to_string(),
                "R_BRACK" => "`]`".to_string(),
                "L_BRACK" => "`[`".to_string(),
                "SEMICOLON" => "`;`".to_string(),
                "COMMA" => "`,`".to_string(),
                "DOT" => "`.`".to_string(),
                "EQ" => "`=`".to_string(),
                "STAR" => "`*`".to_string(),
                "IDENT" => "a name".to_string(),
                "EOF" => "the end of the text".to_string(),
                "command" => "a statement".to_string(),
                k if k.ends_with("_KW")
                    && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
                {
                    format!("`{}`", &k[..k.len() - 3])
                }
                other => other.to_string(),
            };
            format!("{human}{tail}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_transaction_control(kind: SyntaxKind) -> bool {
    matches!(
        kind,
        SyntaxKind::BEGIN
            | SyntaxKind::COMMIT_TRANSACTION
            | SyntaxKind::ROLLBACK_TRANSACTION
            | SyntaxKind::SAVEPOINT
            | SyntaxKind::ROLLBACK_TO_SAVEPOINT
            | SyntaxKind::RELEASE_SAVEPOINT
            | SyntaxKind::PREPARE_TRANSACTION
            | SyntaxKind::COMMIT_PREPARED
            | SyntaxKind::ROLLBACK_PREPARED
    )
}

fn has_concurrently(node: &SyntaxNode) -> bool {
    node.descendants_with_tokens().any(|e| {
        matches!(
            e.kind(),
            SyntaxKind::CONCURRENTLY_KW
                | SyntaxKind::REINDEX_OPTION_CONCURRENTLY
                | SyntaxKind::DETACH_CONCURRENTLY
        )
    })
}

/// Why `node` cannot run inside a transaction block, per the PostgreSQL docs of each command.
fn non_transactional(node: &SyntaxNode) -> Option<&'static str> {
    match node.kind() {
        SyntaxKind::CREATE_INDEX if has_concurrently(node) => {
            Some("CREATE INDEX CONCURRENTLY cannot run inside a transaction")
        }
        SyntaxKind::DROP_INDEX if has_concurrently(node) => {
            Some("DROP INDEX CONCURRENTLY cannot run inside a transaction")
        }
        SyntaxKind::REINDEX if has_concurrently(node) => {
            Some("REINDEX CONCURRENTLY cannot run inside a transaction")
        }
        SyntaxKind::REINDEX
            if node.descendants().any(|d| {
                matches!(
                    d.kind(),
                    SyntaxKind::REINDEX_TARGET_DATABASE
                        | SyntaxKind::REINDEX_TARGET_SYSTEM
                        | SyntaxKind::REINDEX_TARGET_SCHEMA
                )
            }) =>
        {
            Some("REINDEX DATABASE/SYSTEM/SCHEMA cannot run inside a transaction")
        }
        SyntaxKind::ALTER_TABLE if has_concurrently(node) => {
            Some("DETACH PARTITION CONCURRENTLY cannot run inside a transaction")
        }
        SyntaxKind::VACUUM => Some("VACUUM cannot run inside a transaction"),
        SyntaxKind::CREATE_DATABASE => Some("CREATE DATABASE cannot run inside a transaction"),
        SyntaxKind::DROP_DATABASE => Some("DROP DATABASE cannot run inside a transaction"),
        SyntaxKind::ALTER_SYSTEM => Some("ALTER SYSTEM cannot run inside a transaction"),
        SyntaxKind::CREATE_TABLESPACE => Some("CREATE TABLESPACE cannot run inside a transaction"),
        SyntaxKind::DROP_TABLESPACE => Some("DROP TABLESPACE cannot run inside a transaction"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(sql: &str) -> Vec<(String, bool)> {
        split(sql)
            .unwrap()
            .into_iter()
            .map(|s| (s.kind, s.non_transactional.is_some()))
            .collect()
    }

    #[test]
    fn concurrent_and_maintenance_statements_are_non_transactional() {
        for sql in [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a)",
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "REINDEX INDEX CONCURRENTLY i",
            "REINDEX (VERBOSE) TABLE CONCURRENTLY t",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "VACUUM (ANALYZE) t",
            "CREATE DATABASE x",
            "ALTER SYSTEM SET work_mem = '64MB'",
        ] {
            assert!(classify(sql)[0].1, "{sql}");
        }
    }

    #[test]
    fn ordinary_ddl_is_transactional() {
        for sql in [
            "CREATE INDEX i ON t (a)",
            "DROP INDEX i",
            "REINDEX INDEX i",
            "ALTER TABLE t ADD COLUMN c text",
            "ALTER TABLE p DETACH PARTITION c",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 /* CONCURRENTLY */ $$",
            "COMMENT ON TABLE t IS 'create index concurrently'",
        ] {
            assert!(!classify(sql)[0].1, "{sql}");
        }
    }

    #[test]
    fn transaction_control_is_detected() {
        let s = split("BEGIN; SELECT 1; COMMIT;").unwrap();
        assert!(s[0].transaction_control && s[2].transaction_control);
        assert!(!s[1].transaction_control);
    }

    #[test]
    fn offsets_point_at_each_statement() {
        let text = "SELECT 1;\n\n  SELECT 2;";
        let s = split(text).unwrap();
        assert_eq!(&text[s[1].offset..s[1].offset + 8], "SELECT 2");
    }

    #[test]
    fn syntax_errors_carry_an_offset() {
        let e = split("SELECT 1;\nALTER TABEL t ADD c int;").unwrap_err();
        assert!(e[0].offset >= 10, "{e:?}");
    }

    #[test]
    fn parser_token_names_become_what_was_typed() {
        assert_eq!(
            humanize("expected command, found ALTER_KW"),
            "expected a statement, found `ALTER`"
        );
        assert_eq!(humanize("expected R_PAREN"), "expected `)`");
    }

    #[test]
    fn expressions_are_checked() {
        assert!(check_expression("encode(sha256(lower(email)::bytea), 'hex')").is_ok());
        assert!(check_expression("lower(email").is_err());
        assert!(check_expression("1; DROP TABLE x").is_err());
    }
}
