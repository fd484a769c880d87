//! The `pgshift` binary: runtime, logging, exit codes. Everything else is in `cli`.

fn main() {
    let code = pgshift::cli::main();
    std::process::exit(code);
}
