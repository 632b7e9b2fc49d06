//! Tells the live test (`tests/live.rs`) whether it can call the real
//! CometAPI: with `COMETAPI_KEY` set it runs, without it libtest reports it
//! as ignored with the reason, instead of passing without having run.
//! Only the variable's presence is used; its value never leaves the
//! environment.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cometapi_key)");
    println!("cargo::rerun-if-env-changed=COMETAPI_KEY");
    if std::env::var_os("COMETAPI_KEY").is_some_and(|key| !key.is_empty()) {
        println!("cargo::rustc-cfg=cometapi_key");
    }
}
