//! The official OpenAI SDKs (Python and Node) send a body over the default
//! limit, many times: each attempt must end in the SDK's 413 error, never in a
//! connection error, and without a retry.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::HEAVY;
use crate::helpers::TestGateway;

/// Over the default 32 MiB limit by a quarter, as in the report that found
/// the reset connections.
const OVERSIZED_BYTES: usize = 40_000_000;
const ATTEMPTS: usize = 20;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether a missing tool fails the test instead of skipping it.
fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some()
}

/// Runs `command` against a gateway with the default body limit and returns
/// its output, printed for the test log.
async fn run_against_gateway(mut command: Command) -> Output {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start().await;
    assert_eq!(tollgate_gateway::Config::default().server.max_body_bytes, 32 * 1024 * 1024);
    command
        .current_dir(workspace_root())
        .env("TOLLGATE_BASE_URL", format!("{}/v1", gw.url("")))
        .env("SDK_TEST_API_KEY", &gw.key)
        .env("SDK_TEST_OVERSIZED_BYTES", OVERSIZED_BYTES.to_string())
        .env("SDK_TEST_ATTEMPTS", ATTEMPTS.to_string());
    let output = tokio::task::spawn_blocking(move || command.output().expect("the SDK test runs")).await.unwrap();
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(gw.fake.requests().is_empty(), "nothing over the limit reached the upstream");
    output
}

fn outcome(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().find_map(|l| l.trim_start().strip_prefix("OUTCOME ")).unwrap_or("no outcome printed").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_reads_the_413_for_a_body_over_the_limit() {
    let root = workspace_root();
    let python =
        std::env::var_os("TOLLGATE_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    if !python.exists() {
        assert!(!required(), "{} is missing: scripts/test installs the SDK test environment", python.display());
        eprintln!("SKIPPED: the Python SDK test ({} is missing; scripts/test installs it)", python.display());
        return;
    }
    let mut command = Command::new(python);
    command.args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/sdk/test_oversized_body.py"]);
    let output = run_against_gateway(command).await;
    assert!(output.status.success(), "the Python SDK did not read every 413: {}", outcome(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_reads_the_413_for_a_body_over_the_limit() {
    let root = workspace_root();
    let node = std::env::var_os("TOLLGATE_SDK_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let installed = root.join("tests/node/node_modules/openai/package.json");
    if !installed.exists() || !runs(&node) {
        assert!(!required(), "node or {} is missing: scripts/test installs the Node SDK", installed.display());
        eprintln!("SKIPPED: the Node SDK test (node or the openai package is missing; scripts/test installs it)");
        return;
    }
    let mut command = Command::new(node);
    command.args(["--test", "tests/node/oversized_body.test.mjs"]);
    let output = run_against_gateway(command).await;
    assert!(output.status.success(), "the Node SDK did not read every 413: {}", outcome(&output));
}

fn runs(program: &Path) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}
