#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wtc_operator::main_entry()
}
