//! The checksum that pins a running plan to the file it started from.
//!
//! Decision: SHA-256 over the file's exact bytes, printed as lower-case hex.
//! Not over a normalised form: a changed comment is still a changed file, and
//! the operator decides with `--accept-changed` whether it matters. The
//! algorithm is fixed here; changing it would make every recorded plan look
//! changed, so a new algorithm would need a new prefix.

use sha2::{Digest, Sha256};
use std::fmt;

/// SHA-256 of a plan file, as `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum(pub String);

impl Checksum {
    pub fn of(text: &str) -> Checksum {
        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Checksum(format!("sha256:{hex}"))
    }
    /// The first 12 hex digits, enough for a person to compare two checksums.
    pub fn short(&self) -> &str {
        let hex = self.0.strip_prefix("sha256:").unwrap_or(&self.0);
        &hex[..hex.len().min(12)]
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn known_value() {
        assert_eq!(
            Checksum::of("abc").0,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
