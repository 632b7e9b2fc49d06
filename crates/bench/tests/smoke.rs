//! The benchmark harness in smoke mode: every scenario for about a second,
//! against the real binaries, nginx and oha, so the harness cannot rot. The
//! figures of a smoke run are not checked (debug build, tiny sizes); that
//! every scenario ran and reported is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn installed(name: &str, fallback: &str) -> bool {
    let on_path =
        std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()));
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
    on_path || std::path::Path::new(fallback).is_file() || home.join(".cargo/bin").join(name).is_file()
}

#[test]
fn every_scenario_runs_and_reports() {
    let missing: Vec<&str> = [("nginx", "/usr/sbin/nginx"), ("oha", "")]
        .into_iter()
        .filter(|(name, fallback)| !installed(name, fallback))
        .map(|(name, _)| name)
        .collect();
    if !missing.is_empty() {
        let required = std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some();
        assert!(!required, "{missing:?} missing: scripts/ensure-services installs them");
        eprintln!("SKIPPED: the benchmark smoke run ({missing:?} missing; scripts/ensure-services installs them)");
        return;
    }
    let bench = env!("CARGO_BIN_EXE_tollgate-bench");
    let gateway = std::path::Path::new(bench).with_file_name("tollgate");
    assert!(gateway.is_file(), "{} is built by `cargo test --workspace`", gateway.display());

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("benchmarks.md");
    let out = Command::new(bench).arg("--smoke").arg("--out").arg(&report).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&report).unwrap();
    for section in [
        "## Targets",
        "## (a) Added latency",
        "## (b) Throughput",
        "## (c) Streaming",
        "## (d) Memory",
        "## (e) Ledger",
        "## (f) Cost of many keys",
        "| gateway |",
        "| nginx |",
        "| direct |",
    ] {
        assert!(text.contains(section), "the report lacks {section}:\n{text}");
    }
    assert!(text.contains("## (g) A two-target weighted route"), "the report lacks (g):\n{text}");
    assert!(
        text.contains("% of its") && text.contains("checks from the blocks it leases from Redis"),
        "(g) says how many checks its leases admitted:\n{text}"
    );
    // Every check produced a figure, pass or miss.
    let checks = stdout.lines().filter(|l| l.starts_with("PASS ") || l.starts_with("MISS ")).count();
    assert!(checks >= 7, "{stdout}");
    assert!(!text.contains("NaN"), "{text}");
}
