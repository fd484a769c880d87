//! `plan validate` and `plan show` through the built binary.

use crate::harness::*;

#[test]
fn product_example_validates_and_shows_every_step() {
    let file = fixture("plans/good/product_example.yaml");
    let f = file.to_str().unwrap();
    let o = pgshift(&["plan", "validate", f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = pgshift(&["plan", "show", f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    for step in [
        "add_email_hash",
        "index_email_hash",
        "sync_email_hash",
        "fill_email_hash",
        "app_reads_hash",
        "no_nulls_left",
        "hash_present_check",
        "hash_present_validate",
    ] {
        assert!(out.contains(step), "{step} missing from:\n{out}");
    }
    assert!(out.contains("no transaction"), "{out}");
    assert!(
        out.contains("irreversible past step `hash_present_validate`"),
        "{out}"
    );
}
