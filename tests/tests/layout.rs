//! The crate rules of ARCHITECTURE.md, checked on the resolved dependency
//! graph (`cargo metadata`), so that a new dependency cannot quietly break
//! them: the diffusion engine and the domain crate never reach the network
//! stack, the worker never reaches the coordinator or Redis, and the
//! object-storage crate never reaches gRPC, Redis or the engine.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Crates that make up the network stack.
const NETWORK: &[&str] = &[
    "tonic",
    "prost",
    "tokio",
    "redis",
    "tonic-prost",
    "hyper",
    "h2",
    // The engine's spans are plain `tracing`; exporting them is the binaries' business.
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "tracing-opentelemetry",
];

/// The resolved graph: package name → names of its normal (not dev, not build) dependencies.
fn normal_dependencies() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let name = names[node["id"].as_str().unwrap()].to_string();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].to_string());
        graph.entry(name).or_default().extend(deps);
    }
    graph
}

/// Every package `root` reaches through normal dependencies.
fn closure(graph: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            todo.extend(graph.get(&n).into_iter().flatten().cloned());
        }
    }
    seen
}

fn reached<'a>(reach: &BTreeSet<String>, forbidden: &[&'a str]) -> Vec<&'a str> {
    forbidden
        .iter()
        .copied()
        .filter(|f| reach.contains(*f))
        .collect()
}

#[test]
fn diffusion_and_domain_never_reach_the_network_stack() {
    let graph = normal_dependencies();
    for krate in ["kiln-diffusion", "kiln-domain"] {
        let reach = closure(&graph, krate);
        assert!(reach.len() > 1, "{krate} is not in the workspace graph");
        let bad = reached(&reach, NETWORK);
        assert!(bad.is_empty(), "{krate} pulls in {bad:?}");
    }
    let domain = closure(&graph, "kiln-domain");
    assert!(
        !domain.contains("candle-core"),
        "kiln-domain must not pull in candle"
    );
}

#[test]
fn the_worker_never_reaches_the_coordinator_or_redis() {
    let graph = normal_dependencies();
    let reach = closure(&graph, "kiln-worker");
    let bad = reached(&reach, &["kiln-coordinator", "redis"]);
    assert!(bad.is_empty(), "kiln-worker pulls in {bad:?}");
}

#[test]
fn storage_stays_out_of_grpc_redis_and_the_engine() {
    let graph = normal_dependencies();
    let reach = closure(&graph, "kiln-storage");
    assert!(
        reach.contains("object_store"),
        "kiln-storage is not in the workspace graph"
    );
    let bad = reached(
        &reach,
        &[
            "tonic",
            "prost",
            "redis",
            "candle-core",
            "kiln-proto",
            "kiln-diffusion",
            "kiln-coordinator",
            "kiln-worker",
        ],
    );
    assert!(bad.is_empty(), "kiln-storage pulls in {bad:?}");
}

#[test]
fn the_contract_and_the_coordinator_stay_out_of_the_engine() {
    let graph = normal_dependencies();
    let proto = closure(&graph, "kiln-proto");
    let bad = reached(
        &proto,
        &[
            "kiln-coordinator",
            "kiln-worker",
            "kiln-diffusion",
            "candle-core",
            "redis",
        ],
    );
    assert!(bad.is_empty(), "kiln-proto pulls in {bad:?}");
    let coordinator = closure(&graph, "kiln-coordinator");
    let bad = reached(
        &coordinator,
        &["kiln-worker", "kiln-diffusion", "candle-core"],
    );
    assert!(bad.is_empty(), "kiln-coordinator pulls in {bad:?}");
    let tests = closure(&graph, "kiln-tests");
    let bad = reached(
        &tests,
        &["kiln-coordinator", "kiln-worker", "kiln-diffusion"],
    );
    assert!(
        bad.is_empty(),
        "kiln-tests must speak to the farm as a foreign client: it pulls in {bad:?}"
    );
}
