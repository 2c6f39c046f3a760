//! Shared by the agent's tests: repositories built with `wardgate-release`.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod board;
pub mod forge;
pub mod server;

pub const RELEASE: &str = env!("CARGO_BIN_EXE_wardgate-release");

/// Arguments as owned strings, from literals and paths alike.
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$($a.to_string()),*] };
}

pub fn release<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let out = Command::new(RELEASE).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (ok, out) = release(args);
    assert!(ok, "wardgate-release {args:?}: {out}");
    out
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
}

impl Fleet {
    /// Keys for every role (two for targets), and a repository whose targets role needs
    /// `targets_threshold` of them.
    pub fn new(targets_threshold: u64) -> Fleet {
        let f = Fleet {
            dir: tempfile::tempdir().unwrap(),
        };
        for k in [
            "root",
            "targets",
            "targets2",
            "snapshot",
            "timestamp",
            "stranger",
        ] {
            let id = ok(&args!["keygen", f.s(&format!("{k}.key"))]);
            assert_eq!(id.trim().len(), 64, "a hex key id: {id}");
        }
        let t = targets_threshold.to_string();
        ok(&args![
            "init",
            "--repo",
            f.s("repo"),
            "--root-key",
            f.s("root.key"),
            "--targets-key",
            f.s("targets.key"),
            "--targets-key",
            f.s("targets2.key"),
            "--targets-threshold",
            &t,
            "--snapshot-key",
            f.s("snapshot.key"),
            "--timestamp-key",
            f.s("timestamp.key"),
        ]);
        f
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn s(&self, rel: &str) -> String {
        self.p(rel).to_str().unwrap().to_owned()
    }

    /// Writes an image and an SBOM for `version` and adds them signed by `keys`.
    pub fn add(&self, version: &str, keys: &[&str], extra: &[&str]) -> (bool, String) {
        let bytes = format!("image {version}").repeat(1000).into_bytes();
        self.add_image(version, &bytes, keys, extra)
    }

    /// A bundle of `size` bytes that do not repeat (so a misplaced byte changes the hash).
    pub fn add_large(&self, version: &str, size: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (ok, out) = self.add_image(version, &bytes, &SIGNERS, &[]);
        assert!(ok, "{out}");
        bytes
    }

    /// Adds `bytes` as the image of `version`, signed by `keys`.
    pub fn add_image(
        &self,
        version: &str,
        bytes: &[u8],
        keys: &[&str],
        extra: &[&str],
    ) -> (bool, String) {
        let image = self.p(&format!("wardgate-{version}.img"));
        std::fs::write(&image, bytes).unwrap();
        let sbom = self.p(&format!("sbom-{version}.json"));
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sbom.spdx.json"),
        )
        .unwrap();
        std::fs::write(&sbom, template.replace("@VERSION@", version)).unwrap();
        let mut args = args![
            "add",
            "--repo",
            self.s("repo"),
            "--image",
            image.display(),
            "--version",
            version,
            "--hardware",
            "rpi4",
            "--hardware",
            "qemu-virt",
            "--sbom",
            sbom.display(),
        ]
        .to_vec();
        for k in keys {
            args.extend(args!["--key", self.s(&format!("{k}.key"))]);
        }
        args.extend(extra.iter().map(ToString::to_string));
        release(&args)
    }

    pub fn verify(&self) -> (bool, String) {
        release(&args!["verify", "--repo", self.s("repo"), "--json"])
    }
}

pub const SIGNERS: [&str; 3] = ["targets", "snapshot", "timestamp"];

/// The file under `dir` (recursively) whose path ends with `suffix`.
pub fn find(dir: &Path, suffix: &str) -> PathBuf {
    fn walk(dir: &Path, suffix: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()? {
            let p = e.ok()?.path();
            let found = if p.is_dir() {
                walk(&p, suffix)
            } else {
                p.to_string_lossy().ends_with(suffix).then_some(p)
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }
    walk(dir, suffix).unwrap_or_else(|| panic!("no {suffix} under {}", dir.display()))
}

/// Two file-backed slots and the state-file backend (default A) beside the fleet's
/// repository, as the agent's library sees an appliance.
pub fn appliance(f: &Fleet) -> wardgate_agent::slots::Appliance<wardgate_agent::slots::StateFile> {
    use wardgate_agent::slots::{Appliance, BootState, Floor, Slot, StateFile};
    let boot = StateFile {
        path: f.p("boot-state.txt"),
    };
    boot.write(BootState {
        default: Slot::A,
        trial: None,
    })
    .unwrap();
    for s in ["slot-a.img", "slot-b.img"] {
        std::fs::write(f.p(s), vec![0u8; 16]).unwrap();
    }
    Appliance {
        slots: [f.p("slot-a.img"), f.p("slot-b.img")],
        boot,
        floor: Floor {
            path: f.p("floor"),
            factory: None,
        },
        state: wardgate_agent::state::StateDir::new(f.p("")),
    }
}

/// Power-cycles the simulated board: the boot loader's decision, written back.
pub fn reboot(
    a: &wardgate_agent::slots::Appliance<wardgate_agent::slots::StateFile>,
) -> wardgate_agent::slots::Slot {
    use wardgate_agent::slots::BootControl;
    let (slot, after) = wardgate_agent::slots::power_on(a.boot.state().unwrap());
    a.boot.write(after).unwrap();
    slot
}
