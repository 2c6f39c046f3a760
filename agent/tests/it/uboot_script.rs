//! The QEMU image's boot script (`agent/boot/wardgate-boot.cmd`) run by the real U-Boot
//! (Debian's `u-boot-qemu`, qemu_arm64) in `qemu-system-aarch64`, on a disk with a FAT boot
//! partition holding the compiled script and the state file, and two slot partitions.
//! Between boots the agent's state-file backend edits the state file, as it would on the
//! appliance: the script and the agent must agree on every step of a trial.
//!
//! The slots hold no kernel (booting one is the image's test): each boot ends with the
//! script's "no slot booted", after it chose a slot and wrote the state back.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wardgate_agent::slots::{BootControl, BootState, Slot, StateFile};

const UBOOT: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// The FAT partition starts at sector 2048.
const FAT_OFFSET: u64 = 2048 * 512;

fn need(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "{tool} is missing: apt-get install {package} (scripts/test does)"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Disk {
    dir: tempfile::TempDir,
}

impl Disk {
    /// A disk whose two copies of the state hold `state`.
    fn new(state: &str) -> Disk {
        Disk::with_copies(Some(state), Some(state))
    }

    /// A disk whose state copies hold `first` and `second` (`None`: no such file).
    fn with_copies(first: Option<&str>, second: Option<&str>) -> Disk {
        need("qemu-system-aarch64", "qemu-system-arm");
        need("mkimage", "u-boot-tools");
        need("mkfs.vfat", "dosfstools");
        need("mcopy", "mtools");
        need("sfdisk", "fdisk");
        assert!(
            Path::new(UBOOT).exists(),
            "{UBOOT} is missing: apt-get install u-boot-qemu"
        );
        let d = Disk {
            dir: tempfile::tempdir().unwrap(),
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot/wardgate-boot.cmd");
        run(Command::new("mkimage")
            .args([
                "-A", "arm64", "-T", "script", "-C", "none", "-n", "wardgate", "-d",
            ])
            .arg(&script)
            .arg(d.p("boot.scr")));
        run(Command::new("mkfs.vfat")
            .arg("-C")
            .arg(d.p("fat.img"))
            .arg("16384"));
        let mut files = vec![d.p("boot.scr")];
        for (name, text) in [("wardgate-boot.txt", first), ("wardgate-boot.bak", second)] {
            if let Some(text) = text {
                std::fs::write(d.p(name), text).unwrap();
                files.push(d.p(name));
            }
        }
        run(Command::new("mcopy")
            .arg("-i")
            .arg(d.p("fat.img"))
            .args(&files)
            .arg("::"));
        let disk = std::fs::File::create(d.p("disk.img")).unwrap();
        disk.set_len(40 << 20).unwrap();
        drop(disk);
        let mut sfdisk = Command::new("sfdisk")
            .arg("-q")
            .arg(d.p("disk.img"))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"label: dos\nstart=2048, size=32768, type=c, bootable\n\
                  start=34816, size=16384, type=83\nstart=51200, size=16384, type=83\n",
            )
            .unwrap();
        assert!(sfdisk.wait().unwrap().success());
        run(Command::new("dd")
            .arg(format!("if={}", d.p("fat.img").display()))
            .arg(format!("of={}", d.p("disk.img").display()))
            .args(["bs=512", "seek=2048", "conv=notrunc", "status=none"]));
        d
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn image_at(&self) -> String {
        format!("{}@@{FAT_OFFSET}", self.p("disk.img").display())
    }

    /// The state files as the boot partition holds them, copied out for the agent.
    fn state(&self) -> StateFile {
        let host = StateFile {
            path: self.p("host-copy.txt"),
        };
        for (name, to) in [
            ("wardgate-boot.txt", host.path.clone()),
            ("wardgate-boot.bak", host.backup()),
        ] {
            run(Command::new("mcopy")
                .args(["-o", "-n", "-i", &self.image_at(), &format!("::{name}")])
                .arg(&to));
        }
        host
    }

    /// Writes the agent's copies back to the boot partition.
    fn put(&self, s: &StateFile) {
        for (from, name) in [
            (s.path.clone(), "wardgate-boot.txt"),
            (s.backup(), "wardgate-boot.bak"),
        ] {
            run(Command::new("mcopy")
                .args(["-o", "-n", "-i", &self.image_at()])
                .arg(&from)
                .arg(format!("::{name}")));
        }
    }

    /// Powers the board on; returns the slot the script chose (which must have written its
    /// state back).
    fn boot(&self) -> Slot {
        let (slot, written, console) = self.power_on();
        assert!(written, "the script did not write its state:\n{console}");
        slot
    }

    /// Powers the board on: the slot the script chose, whether it wrote its state, and the
    /// console.
    fn power_on(&self) -> (Slot, bool, String) {
        let mut qemu = Command::new("qemu-system-aarch64")
            .args(["-M", "virt", "-cpu", "cortex-a57", "-m", "256", "-smp", "1"])
            .args([
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none",
            ])
            .args(["-bios", UBOOT])
            .arg("-drive")
            .arg(format!(
                "if=none,file={},format=raw,id=d0",
                self.p("disk.img").display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = qemu.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { return };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut chosen, mut written, mut console) = (None, false, Vec::new());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = qemu.kill();
                panic!(
                    "U-Boot did not finish the script in time:\n{}",
                    console.join("\n")
                );
            };
            console.push(line.clone());
            if line.contains("wardgate: state written")
                || line.contains("wardgate: state unchanged")
            {
                written = true;
            }
            if chosen.is_none() {
                if let Some(rest) = line.split("wardgate: booting slot ").nth(1) {
                    chosen = Some(if rest.starts_with('B') {
                        Slot::B
                    } else {
                        Slot::A
                    });
                }
            }
            if line.contains("wardgate: no slot booted") {
                break;
            }
        }
        let _ = qemu.kill();
        let _ = qemu.wait();
        let console = console.join("\n");
        let chosen = chosen.unwrap_or_else(|| panic!("no slot chosen:\n{console}"));
        (chosen, written, console)
    }
}

#[test]
fn uboot_runs_a_trial_once_falls_back_and_boots_a_committed_slot() {
    let disk = Disk::new("default=A\n");
    assert_eq!(disk.boot(), Slot::A);
    assert_eq!(
        disk.state().state().unwrap(),
        BootState {
            default: Slot::A,
            trial: None
        }
    );

    // The agent installed into B and armed one trial.
    let mut s = disk.state();
    s.try_once(Slot::B).unwrap();
    disk.put(&s);
    assert_eq!(disk.boot(), Slot::B, "the trial boots B");
    assert_eq!(
        disk.state().state().unwrap().trial,
        Some((Slot::B, 0)),
        "its try is used up before the kernel starts"
    );
    // B never committed (it hung, or failed its health check): A again.
    assert_eq!(disk.boot(), Slot::A);
    assert_eq!(disk.state().state().unwrap().trial, None);

    // Another trial, this time committed by the agent after a good health check.
    let mut s = disk.state();
    s.try_once(Slot::B).unwrap();
    disk.put(&s);
    assert_eq!(disk.boot(), Slot::B);
    let mut s = disk.state();
    s.commit(Slot::B).unwrap();
    disk.put(&s);
    assert_eq!(disk.boot(), Slot::B, "B is the default now");
    assert_eq!(
        disk.state().state().unwrap(),
        BootState {
            default: Slot::B,
            trial: None
        }
    );
}

/// Issue 13, item 10: the committed slot is never changed silently. A first copy of the
/// state cut short by a power cut is read from the second (B stays the default, and both
/// are whole again after the boot); with neither readable, the script boots A and writes
/// nothing, leaving the card for an engineer rather than committing A.
#[test]
fn uboot_reads_the_second_copy_and_never_invents_a_committed_slot() {
    let disk = Disk::with_copies(Some("defa"), Some("default=B\n"));
    assert_eq!(disk.boot(), Slot::B, "the second copy's committed slot");
    let s = disk.state();
    assert_eq!(
        s.state().unwrap(),
        BootState {
            default: Slot::B,
            trial: None
        }
    );
    let first = std::fs::read_to_string(&s.path).unwrap();
    assert!(
        first.contains("default=B"),
        "the first copy is whole again: {first:?}"
    );

    let disk = Disk::with_copies(Some("garbage"), None);
    let (slot, written, console) = disk.power_on();
    assert_eq!(slot, Slot::A);
    assert!(!written, "the state was rewritten:\n{console}");
    assert!(console.contains("no readable state"), "{console}");
}
