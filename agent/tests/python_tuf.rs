//! Interoperability with python-tuf (PyPI `tuf`), a TUF implementation independent of tough:
//! its `ngclient` runs the client workflow against repositories `wardgate-release` made,
//! served over HTTP by the tests' own server (loopback, a port from the OS).
//!
//! python-tuf lives in the test virtualenv `target/pyvenv` (made by `scripts/test`).

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::server::Server;
use common::{ok, Fleet, SIGNERS};

fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    let found = std::process::Command::new(&py)
        .args(["-c", "import tuf.ngclient, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "python-tuf is missing from {}: scripts/test installs it (python3 -m venv target/pyvenv; \
         pip install tuf==6.0.0 'securesystemslib[crypto]==1.6.0')",
        py.display()
    );
    py
}

/// Runs `tests/tuf/ngclient.py` with its state in `f`'s `work`, trusting root 1 at first
/// use; returns its JSON answer.
async fn ngclient(f: &Fleet, server: &Server, work: &str, targets: &[String]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tuf/ngclient.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(f.p("repo/metadata/1.root.json"))
        .arg(server.url("http", "metadata/").as_str())
        .arg(server.url("http", "targets/").as_str())
        .arg(f.p(work))
        .args(targets)
        .output()
        .await
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "ngclient: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Every target the newest targets metadata lists, with the hex SHA-256 of the file it
/// was made from.
fn listed_targets(f: &Fleet) -> Vec<(String, String)> {
    let (good, out) = f.verify();
    assert!(good, "{out}");
    let version = serde_json::from_str::<serde_json::Value>(&out).unwrap()["targets_version"]
        .as_u64()
        .unwrap();
    let targets: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.p(&format!("repo/metadata/{version}.targets.json"))).unwrap(),
    )
    .unwrap();
    targets["signed"]["targets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t["hashes"]["sha256"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn python_tuf_reads_and_downloads_what_wardgate_release_made_across_a_root_rotation() {
    let f = Fleet::new(1);
    assert!(f.add("1.0.0", &SIGNERS, &[]).0);
    let server = Server::start(f.p("repo"), None).await;
    let first = listed_targets(&f);
    let names: Vec<String> = first.iter().map(|(n, _)| n.clone()).collect();
    let got = ngclient(&f, &server, "py", &names).await;
    assert_eq!(got["ok"], true, "{got}");
    for (name, sha256) in &first {
        assert_eq!(got["targets"][name], sha256.as_str(), "{name}: {got}");
    }

    // The root keys rotate and a new bundle comes: the same client (its trusted metadata
    // kept in `py`) follows root 2 and downloads it.
    ok(&args!["keygen", f.s("newroot.key")]);
    ok(&args![
        "rotate",
        "--repo",
        f.s("repo"),
        "--old-key",
        f.s("root.key"),
        "--new-key",
        f.s("newroot.key")
    ]);
    assert!(f.add("1.1.0", &SIGNERS, &[]).0);
    let all = listed_targets(&f);
    let newer: Vec<String> = all
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n.contains("1.1.0"))
        .collect();
    assert_eq!(newer.len(), 2, "an image and its SBOM: {all:?}");
    let got = ngclient(&f, &server, "py", &newer).await;
    assert_eq!(got["ok"], true, "{got}");
    let trusted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.p("py/metadata/root.json")).unwrap()).unwrap();
    assert_eq!(
        trusted["signed"]["version"], 2,
        "python-tuf trusts root 2 now"
    );
}
