//! What is wrong with a plan file: diagnostics with their position, step, rule
//! and help, and the error that carries them.

use std::fmt;
use std::path::PathBuf;

use super::raw::Pos;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a plan file: where, in which step, what, and what would be valid.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub severity: Severity,
    /// `syntax`, `unknown-key`, … or a lint rule name (squawk's or pgshift's).
    pub rule: String,
    pub step: Option<String>,
    pub message: String,
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {sev}[{}]: ",
            self.file.display(),
            self.pos,
            self.rule
        )?;
        if let Some(step) = &self.step {
            write!(f, "step `{step}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Why a plan could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read plan file `{}`: {reason}", file.display())]
    Unreadable { file: PathBuf, reason: String },
    #[error("{}", render(diagnostics))]
    Invalid {
        file: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl Error {
    /// Every diagnostic the error carries (an unreadable file is one).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            Error::Unreadable { file, reason } => vec![Diagnostic {
                file: file.clone(),
                pos: Pos { line: 1, col: 1 },
                severity: Severity::Error,
                rule: "file".into(),
                step: None,
                message: format!("cannot read the plan file: {reason}"),
                help: None,
            }],
            Error::Invalid { diagnostics, .. } => diagnostics.clone(),
        }
    }
}

fn render(diags: &[Diagnostic]) -> String {
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let mut s = diags
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    s.push_str(&format!(
        "\n{errors} error(s) in the plan; nothing was changed"
    ));
    s
}
