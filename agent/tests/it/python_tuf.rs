//! Interoperability with python-tuf (PyPI `tuf`), a TUF implementation independent of tough,
//! both ways: its `ngclient` runs the client workflow against repositories `wardgate-release`
//! made, and the agent loads and installs from repositories its metadata API made
//! (`tests/tuf/repo.py`), attacks included. Served over HTTP by the tests' own server
//! (loopback, a port from the OS).
//!
//! python-tuf lives in the test virtualenv `target/pyvenv` (made by `scripts/test`).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};

use common::server::Server;
use common::{ok, Fleet, SIGNERS};
use wardgate_agent::http::{Fetcher, Limits};
use wardgate_agent::slots::BootControl;
use wardgate_agent::update;

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

/// A repository python-tuf's metadata API made (`tests/tuf/repo.py`), in `f`'s `py-repo`.
struct PyRepo<'a> {
    f: &'a Fleet,
}

impl PyRepo<'_> {
    fn new(f: &Fleet) -> PyRepo<'_> {
        let r = PyRepo { f };
        r.run(&["init"], &[]);
        r
    }

    /// Runs `repo.py COMMAND py-repo ARGS`; panics with its words if it fails.
    fn run(&self, command: &[&str], args: &[&str]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tuf/repo.py");
        let out = std::process::Command::new(python())
            .arg(script)
            .args(command)
            .arg(self.f.p("py-repo"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "repo.py {command:?} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds bundle `version` (its image: `image` repeated) with the given hash algorithms.
    fn add(&self, version: &str, image: &str, extra: &[&str]) -> Vec<u8> {
        let bytes = image.repeat(2000).into_bytes();
        let img = self.f.p(&format!("py-{version}.img"));
        std::fs::write(&img, &bytes).unwrap();
        let sbom = self.f.p(&format!("py-sbom-{version}.json"));
        std::fs::write(&sbom, format!("{{\"version\": \"{version}\"}}")).unwrap();
        let mut args = vec![
            version.to_owned(),
            img.display().to_string(),
            sbom.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&["add"], &args);
        bytes
    }

    /// The agent's view of it over HTTP, trusting its root 1, with its own datastore.
    fn source(&self, server: &Server) -> update::Source {
        update::Source {
            metadata_url: server.url("http", "metadata/"),
            targets_url: server.url("http", "targets/"),
            trusted_root: self.f.p("py-repo/metadata/1.root.json"),
            datastore: self.f.p("py-store"),
            fetcher: Fetcher::new(Limits::default(), None),
        }
    }
}

fn v(s: &str) -> update::Version {
    s.parse().unwrap()
}

/// Loads the repository as the agent does and installs its newest bundle into slot B.
async fn install_newest(f: &Fleet, py: &PyRepo<'_>, server: &Server) -> Result<String, String> {
    let repo = update::load(&py.source(server))
        .await
        .map_err(|e| e.to_string())?;
    let c = update::newest(&repo, "qemu-virt", &v("1.0.0"))
        .map_err(|e| e.to_string())?
        .ok_or("no bundle for qemu-virt")?;
    let mut a = common::appliance(f);
    a.install(&repo, &c).await.map_err(|e| e.to_string())?;
    Ok(c.version.to_string())
}

/// [`install_newest`] installs `version`, and slot B then starts with `image`.
async fn installs(f: &Fleet, py: &PyRepo<'_>, server: &Server, version: &str, image: &[u8]) {
    assert_eq!(install_newest(f, py, server).await.unwrap(), version);
    let slot = std::fs::read(f.p("slot-b.img")).unwrap();
    assert_eq!(&slot[..image.len()], image);
}

async fn py_served() -> (Fleet, Server) {
    let f = Fleet::new(1);
    let server = Server::start(f.p("py-repo"), None).await;
    (f, server)
}

#[tokio::test]
async fn a_bundle_in_a_repository_python_tuf_made_is_installed_byte_for_byte() {
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    let image = py.add(
        "1.1.0",
        "python-tuf made this ",
        &["--hash", "sha256", "--hash", "sha512"],
    );
    installs(&f, &py, &server, "1.1.0", &image).await;
}

#[tokio::test]
async fn a_bundle_a_delegated_role_lists_is_found_and_installed() {
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    let image = py.add("1.2.0", "listed by the bundles role ", &["--delegate"]);
    installs(&f, &py, &server, "1.2.0", &image).await;
}

#[tokio::test]
async fn python_tuf_repositories_under_attack_are_refused_as_tough_made_ones_are() {
    // An expired timestamp.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    py.run(&["timestamp"], &["--expired"]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("expire"), "{e}");

    // Targets signed by a key the root does not name.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    py.run(&["stranger-targets"], &[]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("signature"), "{e}");

    // A timestamp rolled back below the one the board already trusts.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    update::load(&py.source(&server)).await.unwrap();
    py.run(&["timestamp"], &["--version", "1"]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("version"), "{e}");

    // An image whose bytes do not match its hash: refused, nothing armed.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    py.run(&["flip"], &["1.1.0-py-1.1.0.img"]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("hash"), "{e}");
    assert_eq!(common::appliance(&f).boot.state().unwrap().trial, None);
}

#[tokio::test]
async fn a_python_tuf_root_rotation_is_followed_only_with_both_signatures_and_sticks() {
    // Root 2 signed by its new key alone: refused.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    py.run(&["rotate-root"], &["--sign-with", "root2"]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("root"), "{e}");

    // Signed by the old and the new key: followed. Then a root 3 signed by the old key
    // alone (which root 2 no longer names) is refused: the board trusts the new key only.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "good ", &[]);
    py.run(&["rotate-root"], &[]);
    assert_eq!(install_newest(&f, &py, &server).await.unwrap(), "1.1.0");
    let trusted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.p("py-store/root.json")).unwrap()).unwrap();
    assert_eq!(trusted["signed"]["version"], 2);
    py.run(
        &["rotate-root"],
        &["--sign-with", "root", "--sign-with", "root3"],
    );
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("root"), "{e}");
}

#[tokio::test]
async fn a_bundle_hashed_with_sha512_alone_is_installed_and_checked() {
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    let image = py.add("1.1.0", "sha512 only ", &["--hash", "sha512"]);
    installs(&f, &py, &server, "1.1.0", &image).await;

    // The SHA-512 is checked, not skipped: a flipped bit is refused, nothing armed.
    let (f, server) = py_served().await;
    let py = PyRepo::new(&f);
    py.add("1.1.0", "sha512 only ", &["--hash", "sha512"]);
    py.run(&["flip"], &["1.1.0-py-1.1.0.img"]);
    let e = install_newest(&f, &py, &server).await.unwrap_err();
    assert!(e.to_lowercase().contains("hash"), "{e}");
    assert_eq!(common::appliance(&f).boot.state().unwrap().trial, None);
}
