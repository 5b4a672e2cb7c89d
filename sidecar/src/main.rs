#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wtc_sidecar::main_entry()
}
