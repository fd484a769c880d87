//! SQL identifiers as plans write them, and the one helper that quotes them.
//!
//! A plan names tables and columns in SQL syntax: `leads`, `public.leads`,
//! `"Lead Emails"`. Unquoted names fold to lower case as PostgreSQL folds them;
//! double-quoted names are taken literally. Anything else (a semicolon, a
//! comment, a stray quote) is rejected while validating, so nothing a plan puts
//! in a name can reach generated SQL except as a quoted identifier.

use std::fmt;

/// PostgreSQL truncates identifiers longer than this many bytes.
pub const MAX_IDENT_BYTES: usize = 63;

/// One identifier, already folded or unquoted: the exact name in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(pub String);

impl Ident {
    /// The identifier quoted for SQL: always double-quoted, inner quotes doubled.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
    /// The bare catalog name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

/// A relation name with an optional schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedName {
    pub schema: Option<Ident>,
    pub name: Ident,
}

impl QualifiedName {
    /// The name quoted for SQL (`"public"."leads"` or `"leads"`).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", s.quoted(), self.name.quoted()),
            None => self.name.quoted(),
        }
    }
    /// The name as a string literal suitable for `::regclass`.
    pub fn regclass_literal(&self) -> String {
        quote_literal(&self.quoted())
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

/// Quotes an identifier for SQL. Every identifier pgshift generates goes through here.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
///
/// Text with a backslash is written as an escape string (`E'…'`, backslashes
/// doubled), which means the same whatever `standard_conforming_strings` is: a
/// database or role can set it to `off`, and then a plain `'a\'` would end the
/// literal somewhere else and let the rest of a name through as SQL.
pub fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Why a name is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentError {
    Empty,
    TooLong(usize),
    Invalid(String),
}

impl fmt::Display for IdentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentError::Empty => f.write_str("the name is empty"),
            IdentError::TooLong(n) => write!(
                f,
                "the name is {n} bytes long; PostgreSQL keeps only the first {MAX_IDENT_BYTES}"
            ),
            IdentError::Invalid(why) => f.write_str(why),
        }
    }
}

/// Parses one identifier in SQL syntax (`email`, `"Email Hash"`).
pub fn parse_ident(text: &str) -> Result<Ident, IdentError> {
    let parts = parse_parts(text)?;
    match parts.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(IdentError::Invalid(
            "expected a single name here, without a schema".to_string(),
        )),
    }
}

/// Parses a relation name in SQL syntax (`leads`, `public.leads`, `"My Schema"."Leads"`).
pub fn parse_qualified(text: &str) -> Result<QualifiedName, IdentError> {
    let mut parts = parse_parts(text)?;
    match parts.len() {
        1 => Ok(QualifiedName {
            schema: None,
            name: parts.remove(0),
        }),
        2 => {
            let name = parts.remove(1);
            Ok(QualifiedName {
                schema: Some(parts.remove(0)),
                name,
            })
        }
        _ => Err(IdentError::Invalid(
            "expected `table` or `schema.table`, not more parts".to_string(),
        )),
    }
}

fn parse_parts(text: &str) -> Result<Vec<Ident>, IdentError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(IdentError::Empty);
    }
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut name = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    Some('"') => break,
                    Some('\0') => {
                        return Err(IdentError::Invalid(
                            "a name cannot contain a NUL byte".into(),
                        ));
                    }
                    Some(c) => name.push(c),
                    None => {
                        return Err(IdentError::Invalid(
                            "a double-quoted name is missing its closing `\"`".into(),
                        ));
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii() {
                    name.push(c.to_ascii_lowercase());
                    chars.next();
                } else {
                    break;
                }
            }
            let starts_ok = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii());
            if !starts_ok {
                return Err(IdentError::Invalid(format!(
                    "`{text}` is not a valid name: an unquoted name starts with a letter or `_` and \
                     holds only letters, digits, `_` and `$`; double-quote any other name (\"Like This\")"
                )));
            }
        }
        if name.is_empty() {
            return Err(IdentError::Empty);
        }
        if name.len() > MAX_IDENT_BYTES {
            return Err(IdentError::TooLong(name.len()));
        }
        parts.push(Ident(name));
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => {
                return Err(IdentError::Invalid(format!(
                    "`{text}` is not a valid name: unexpected `{c}`; double-quote a name that \
                     contains spaces or punctuation (\"Like This\")"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquoted_names_fold_to_lower_case() {
        assert_eq!(parse_ident("Email_Hash").unwrap().0, "email_hash");
        let q = parse_qualified("Public.Leads").unwrap();
        assert_eq!(q.quoted(), "\"public\".\"leads\"");
    }

    #[test]
    fn quoted_names_are_literal() {
        let q = parse_qualified(r#""My ""Schema"".x"."Lead Emails""#).unwrap();
        assert_eq!(q.schema.unwrap().0, "My \"Schema\".x");
        assert_eq!(q.name.0, "Lead Emails");
    }

    #[test]
    fn injection_through_a_name_is_rejected() {
        assert!(parse_qualified("leads; DROP TABLE users").is_err());
        assert!(parse_ident("a--b").is_err());
        assert!(parse_ident("email hash").is_err());
        assert!(parse_qualified("a.b.c").is_err());
        assert!(parse_ident("\"unterminated").is_err());
    }

    #[test]
    fn backslashes_are_quoted_whatever_standard_conforming_strings_is() {
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }

    #[test]
    fn quoting_doubles_inner_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn names_over_63_bytes_are_rejected() {
        let long = "a".repeat(64);
        assert_eq!(parse_ident(&long), Err(IdentError::TooLong(64)));
        assert!(parse_ident(&"a".repeat(63)).is_ok());
    }
}
