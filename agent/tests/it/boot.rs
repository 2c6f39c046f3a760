//! The boot backends against what they drive: U-Boot's environment through the real
//! `fw_printenv` / `fw_setenv` (libubootenv-tool) on an environment image made by
//! `mkenvimage` (u-boot-tools), as a board's boot script would read it; the Raspberry Pi's
//! `autoboot.txt` as its firmware reads it.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use wardgate_agent::boot::{RpiTryboot, UBootEnv};
use wardgate_agent::slots::{BootControl, BootState, Slot};

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        found,
        "{tool} is missing: apt-get install {package} (scripts/test does)"
    );
}

/// A 16 KiB U-Boot environment image with a board's own variable, and its fw_env.config.
fn uboot_env(dir: &std::path::Path) -> UBootEnv {
    need("mkenvimage", "u-boot-tools");
    need("fw_setenv", "libubootenv-tool");
    std::fs::write(
        dir.join("env.txt"),
        "bootdelay=2\nbootcmd=run wardgate_boot\n",
    )
    .unwrap();
    let ok = Command::new("mkenvimage")
        .args(["-s", "0x4000", "-o"])
        .arg(dir.join("env.bin"))
        .arg(dir.join("env.txt"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkenvimage failed");
    std::fs::write(
        dir.join("fw_env.config"),
        format!("{} 0x0 0x4000\n", dir.join("env.bin").display()),
    )
    .unwrap();
    UBootEnv {
        fw_env_config: Some(dir.join("fw_env.config")),
    }
}

fn printenv(dir: &std::path::Path) -> String {
    let out = Command::new("fw_printenv")
        .arg("-c")
        .arg(dir.join("fw_env.config"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_uboot_environment_carries_a_trial_its_commit_and_its_abandonment() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = uboot_env(dir.path());
    // A board that never had an update boots A.
    assert_eq!(
        env.state().unwrap(),
        BootState {
            default: Slot::A,
            trial: None
        }
    );
    env.try_once(Slot::B).unwrap();
    let text = printenv(dir.path());
    for want in [
        "wardgate_default=A",
        "wardgate_try=B",
        "wardgate_tries=1",
        "bootdelay=2",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert_eq!(env.state().unwrap().trial, Some((Slot::B, 1)));

    // The boot script counted the try down; the agent abandons the trial.
    let ok = Command::new("fw_setenv")
        .arg("-c")
        .arg(dir.path().join("fw_env.config"))
        .args(["wardgate_tries", "0"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(env.state().unwrap().trial, Some((Slot::B, 0)));
    env.abandon().unwrap();
    let text = printenv(dir.path());
    assert!(!text.contains("wardgate_try"), "{text}");
    assert_eq!(env.state().unwrap().default, Slot::A);

    env.try_once(Slot::B).unwrap();
    env.commit(Slot::B).unwrap();
    let text = printenv(dir.path());
    assert!(text.contains("wardgate_default=B"), "{text}");
    assert!(!text.contains("wardgate_try"), "{text}");
    assert!(
        text.contains("bootcmd=run wardgate_boot"),
        "the board's own variables stay"
    );
}

#[test]
fn a_corrupt_uboot_variable_and_a_missing_environment_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let env = uboot_env(dir.path());
    let ok = Command::new("fw_setenv")
        .arg("-c")
        .arg(dir.path().join("fw_env.config"))
        .args(["wardgate_default", "C"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let e = env.state().unwrap_err().to_string();
    assert!(e.contains("wardgate_default=C"), "{e}");

    let missing = UBootEnv {
        fw_env_config: Some(dir.path().join("nope.config")),
    };
    let e = missing.state().unwrap_err().to_string();
    assert!(e.contains("fw_printenv"), "{e}");
}

#[test]
fn autoboot_txt_names_the_default_and_the_tryboot_partition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("autoboot.txt");
    std::fs::write(&path, "[all]\ntryboot_a_b=1\nboot_partition=2\n").unwrap();
    let mut rpi = RpiTryboot {
        autoboot: path.clone(),
        partitions: [2, 3],
    };
    assert_eq!(
        rpi.state().unwrap(),
        BootState {
            default: Slot::A,
            trial: None
        }
    );
    rpi.try_once(Slot::B).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.ends_with("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"),
        "{text}"
    );
    assert_eq!(rpi.state().unwrap().trial, Some((Slot::B, 1)));
    rpi.abandon().unwrap();
    assert!(!std::fs::read_to_string(&path)
        .unwrap()
        .contains("[tryboot]"));
    rpi.try_once(Slot::B).unwrap();
    rpi.commit(Slot::B).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("[all]\ntryboot_a_b=1\nboot_partition=3\n"),
        "{text}"
    );
    assert!(!text.contains("[tryboot]"));

    std::fs::write(&path, "[all]\nboot_partition=7\n").unwrap();
    let e = rpi.state().unwrap_err().to_string();
    assert!(e.contains("boot_partition=7"), "{e}");
}
