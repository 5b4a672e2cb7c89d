//! The sidecar built with its hold points (feature `test-hooks`), for the end-to-end suites.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wtc_sidecar::main_entry()
}
