//! The sidecar of the end-to-end suites: the shipped sidecar with its cache store wrapped in hold
//! points (and, on request, the weakened protocol), and the holds' control routes (`hooks`).
#![forbid(unsafe_code)]

use std::sync::Arc;
use wtc_tests::hooks::{Control, Held, Hooks, Weakened};

fn main() -> std::process::ExitCode {
    let hooks = Arc::new(Hooks::default());
    let held = Arc::clone(&hooks);
    wtc_sidecar::main_with(
        move |cache, config| Held::new(Weakened::from_env(cache, &config.redis.url), held),
        Some(Arc::new(Control(hooks))),
    )
}
