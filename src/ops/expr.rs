//! The one expression an operation is given (`up`, `down`, `fill`, a check),
//! reused in every place it is needed: as written for a backfill or a check,
//! over `NEW` for a trigger, with one column renamed for a twin's constraint.
//! Rewrites work on squawk's tokens, never on raw text, so a column name inside
//! a string literal or a comment is left alone.

use squawk_syntax::{SourceFile, SyntaxKind};

use crate::ident::quote_ident;

/// The tokens of `SELECT <expr>` after `SELECT `, trivia included, or `None`
/// when the expression does not parse.
fn tokens(expr: &str) -> Option<Vec<(SyntaxKind, String)>> {
    let parse = SourceFile::parse(&format!("SELECT {expr}"));
    if !parse.errors().is_empty() {
        return None;
    }
    let all: Vec<(SyntaxKind, String)> = parse
        .syntax_node()
        .descendants_with_tokens()
        .filter_map(|e| e.into_token())
        .map(|t| (t.kind(), t.text().to_string()))
        .collect();
    // Drop `SELECT` and the space after it.
    let start = all
        .iter()
        .position(|(k, _)| *k == SyntaxKind::SELECT_KW)
        .map(|i| i + 1)?;
    let rest = &all[start..];
    let skip = rest.iter().take_while(|(k, _)| k.is_trivia()).count();
    Some(rest[skip..].to_vec())
}

/// The name a token spells, folded as PostgreSQL folds it.
fn folded(text: &str) -> String {
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => text.to_ascii_lowercase(),
    }
}

/// Rewrites the tokens that name a column (per `is_column`) with `with`.
///
/// A token names a column when it is a name (an identifier, or a keyword that
/// `is_column` accepts), is not a function name (followed by `(`), not a field
/// or qualified name (next to a `.`), and not a type (after `::`).
fn rewrite(
    expr: &str,
    is_column: impl Fn(&str, bool) -> bool,
    with: impl Fn(&str) -> String,
) -> Option<String> {
    let toks = tokens(expr)?;
    let significant: Vec<usize> = (0..toks.len())
        .filter(|&i| !toks[i].0.is_trivia())
        .collect();
    let mut out = String::new();
    // One entry per open parenthesis: true when it opens a subquery, whose names
    // belong to its own FROM and are left alone.
    let mut parens: Vec<bool> = Vec::new();
    for (i, (kind, text)) in toks.iter().enumerate() {
        match kind {
            SyntaxKind::L_PAREN => {
                let next = significant.iter().find(|&&j| j > i).map(|&j| toks[j].0);
                parens.push(matches!(
                    next,
                    Some(SyntaxKind::SELECT_KW | SyntaxKind::WITH_KW | SyntaxKind::VALUES_KW)
                ));
            }
            SyntaxKind::R_PAREN => {
                parens.pop();
            }
            _ => {}
        }
        let in_subquery = parens.iter().any(|s| *s);
        let name_like = (*kind == SyntaxKind::IDENT || kind.is_keyword()) && !in_subquery;
        let pos = significant.iter().position(|&j| j == i);
        let (prev, prev2, next) = match pos {
            Some(p) => (
                p.checked_sub(1).map(|q| toks[significant[q]].0),
                p.checked_sub(2).map(|q| toks[significant[q]].0),
                significant.get(p + 1).map(|&q| toks[q].0),
            ),
            None => (None, None, None),
        };
        let is_call = next == Some(SyntaxKind::L_PAREN);
        let dotted = prev == Some(SyntaxKind::DOT) || next == Some(SyntaxKind::DOT);
        let typed = prev == Some(SyntaxKind::COLON) && prev2 == Some(SyntaxKind::COLON)
            || prev == Some(SyntaxKind::AS_KW);
        if name_like
            && !is_call
            && !dotted
            && !typed
            && is_column(&folded(text), *kind == SyntaxKind::IDENT)
        {
            out.push_str(&with(&folded(text)));
        } else {
            out.push_str(text);
        }
    }
    Some(out.trim_end().to_string())
}

/// `expr` with its columns read from `NEW` (for a trigger): `lower(email)` →
/// `lower(NEW."email")`. With `columns` (from the catalog), exactly those names
/// are columns; without, every plain identifier that is not a function or type is.
pub fn over_new(expr: &str, columns: Option<&[String]>) -> String {
    rewrite(
        expr,
        |name, ident| match columns {
            Some(cols) => cols.iter().any(|c| c == name),
            None => ident,
        },
        |name| format!("NEW.{}", quote_ident(name)),
    )
    .unwrap_or_else(|| expr.to_string())
}

/// `expr` with column `from` renamed `to` (for a twin's constraint or index predicate).
pub fn rename_column(expr: &str, from: &str, to: &str) -> String {
    rewrite(expr, |name, _| name == from, |_| quote_ident(to)).unwrap_or_else(|| expr.to_string())
}

/// True when `expr` reads column `column`.
pub fn reads(expr: &str, column: &str) -> bool {
    rename_column(expr, column, "\u{1}pgshift\u{1}") != expr
}

/// True when `expr` is a constant: literals, casts of literals, signs and
/// parentheses only. Such a default is stored once in the catalog (PostgreSQL
/// 11+ adds the column without rewriting the table); any other is computed per
/// row and must be backfilled.
pub fn is_constant(expr: &str) -> bool {
    let Some(toks) = tokens(expr) else {
        return false;
    };
    // Inside a type name after `::` (`'x'::character varying`), words are allowed.
    let mut in_type = false;
    for (kind, _) in toks.iter().filter(|(k, _)| !k.is_trivia()) {
        match kind {
            SyntaxKind::COLON => in_type = true,
            SyntaxKind::L_PAREN
            | SyntaxKind::R_PAREN
            | SyntaxKind::L_BRACK
            | SyntaxKind::R_BRACK => {}
            SyntaxKind::STRING
            | SyntaxKind::INT_NUMBER
            | SyntaxKind::NUMERIC_NUMBER
            | SyntaxKind::ESC_STRING
            | SyntaxKind::DOLLAR_QUOTED_STRING
            | SyntaxKind::MINUS
            | SyntaxKind::PLUS
            | SyntaxKind::COMMA
            | SyntaxKind::TRUE_KW
            | SyntaxKind::FALSE_KW
            | SyntaxKind::NULL_KW => in_type = false,
            k if in_type && (k.is_keyword() || *k == SyntaxKind::IDENT) => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_read_from_new_functions_and_types_are_not() {
        assert_eq!(
            over_new("encode(sha256(lower(email)::bytea), 'hex')", None),
            "encode(sha256(lower(NEW.\"email\")::bytea), 'hex')"
        );
        assert_eq!(
            over_new(
                "coalesce(persona_id, (SELECT id FROM personas WHERE key = 'unknown'))",
                Some(&["persona_id".into(), "id".into()])
            ),
            "coalesce(NEW.\"persona_id\", (SELECT id FROM personas WHERE key = 'unknown'))"
        );
        assert_eq!(
            over_new(
                "coalesce(persona_id, (SELECT id FROM personas WHERE key = 'unknown'))",
                None
            ),
            "coalesce(NEW.\"persona_id\", (SELECT id FROM personas WHERE key = 'unknown'))"
        );
        // A string that spells a column is left alone.
        assert_eq!(
            over_new("email || 'email'", None),
            "NEW.\"email\" || 'email'"
        );
        assert_eq!(over_new("\"Email\"::text", None), "NEW.\"Email\"::text");
    }

    #[test]
    fn renaming_a_column_in_an_expression() {
        assert_eq!(
            rename_column("id > 0 AND id <> other_id", "id", "pgshift_new_id"),
            "\"pgshift_new_id\" > 0 AND \"pgshift_new_id\" <> other_id"
        );
        assert!(reads("lower(email) <> ''", "email"));
        assert!(!reads("lower(email) <> 'id'", "id"));
    }

    #[test]
    fn constants_are_told_from_computed_defaults() {
        for c in [
            "'new'",
            "0",
            "-1",
            "false",
            "'{}'::jsonb",
            "NULL",
            "1.5",
            "'x'::character varying",
        ] {
            assert!(is_constant(c), "{c}");
        }
        for c in [
            "now()",
            "gen_random_uuid()",
            "nextval('s')",
            "other_col",
            "1 + x",
        ] {
            assert!(!is_constant(c), "{c}");
        }
    }
}
