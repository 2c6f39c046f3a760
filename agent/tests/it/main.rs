//! The agent's integration tests, in one binary (as the gateway's system tests are): each
//! module starts its own peers — a local repository server, the real `fw_setenv`, U-Boot
//! under QEMU, python-tuf — and `common` holds what they share (fleets, boards, forged
//! metadata, the test server).

#[macro_use]
mod common;

mod agent;
mod attacks;
mod boot;
mod http;
mod python_tuf;
mod release;
mod uboot_script;
mod update;
