//! `wardgate-release`: keys, TUF repository and bundles for wardgate appliances.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tough::schema::RoleType;
mod repo;

use repo::{Bundle, RoleSpec};

#[derive(Debug, Parser)]
#[command(
    name = "wardgate-release",
    version,
    about = "Signed update repositories for wardgate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make an Ed25519 key (PKCS#8, mode 0600) and print its key id.
    Keygen { out: PathBuf },
    /// Create a repository: root naming every role's keys and threshold, signed by the root
    /// keys; empty targets, snapshot and timestamp.
    Init {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        targets_threshold: u64,
        #[arg(long = "snapshot-key", required = true)]
        snapshot_keys: Vec<PathBuf>,
        #[arg(long = "timestamp-key", required = true)]
        timestamp_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = repo::DEFAULT_ROOT_DAYS)]
        root_days: u64,
        #[arg(long, default_value_t = repo::DEFAULT_DAYS)]
        days: u64,
    },
    /// Add a bundle (image, version, compatible hardware, SBOM) and re-sign.
    Add {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long = "hardware", required = true)]
        hardware: Vec<String>,
        #[arg(long)]
        sbom: PathBuf,
        /// Keys for targets, snapshot and timestamp.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long, default_value_t = repo::DEFAULT_DAYS)]
        days: u64,
    },
    /// Re-sign snapshot and timestamp before they expire (their keys alone).
    Refresh {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long, default_value_t = repo::DEFAULT_DAYS)]
        days: u64,
    },
    /// Replace the root keys: a new root version signed by the current root keys (up to the
    /// current threshold) and by the new ones (up to the new threshold).
    Rotate {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long = "old-key", required = true)]
        old_keys: Vec<PathBuf>,
        #[arg(long = "new-key", required = true)]
        new_keys: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        threshold: u64,
        #[arg(long, default_value_t = repo::DEFAULT_ROOT_DAYS)]
        days: u64,
    },
    /// Load the repository as a client would, check every target, list the images.
    Verify {
        #[arg(long)]
        repo: PathBuf,
        /// The trusted root (default: the repository's first root).
        #[arg(long)]
        root: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wardgate-release: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wardgate-release: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out } => {
            let id = repo::keygen(&out).await?;
            println!("{id}");
        }
        Command::Init {
            repo,
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
            snapshot_keys,
            timestamp_keys,
            root_days,
            days,
        } => {
            let spec = |keys: Vec<PathBuf>, threshold| RoleSpec { keys, threshold };
            let roles = HashMap::from([
                (RoleType::Root, spec(root_keys, root_threshold)),
                (RoleType::Targets, spec(targets_keys, targets_threshold)),
                (RoleType::Snapshot, spec(snapshot_keys, 1)),
                (RoleType::Timestamp, spec(timestamp_keys, 1)),
            ]);
            repo::init(&repo, &roles, root_days, days).await?;
            println!("repository created in {}", repo.display());
        }
        Command::Add {
            repo,
            image,
            version,
            hardware,
            sbom,
            keys,
            days,
        } => {
            let bundle = Bundle {
                image,
                version,
                hardware,
                sbom,
            };
            repo::add(&repo, &bundle, &keys, days).await?;
            println!("added {}", bundle.version);
        }
        Command::Refresh { repo, keys, days } => {
            repo::refresh(&repo, &keys, days).await?;
            println!("snapshot and timestamp re-signed");
        }
        Command::Rotate {
            repo,
            old_keys,
            new_keys,
            threshold,
            days,
        } => {
            let v = repo::rotate(&repo, &old_keys, &new_keys, threshold, days).await?;
            println!("root version {v} written");
        }
        Command::Verify { repo, root, json } => {
            let listing = repo::verify(&repo, root.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                println!(
                    "targets version {}, expires {}",
                    listing.targets_version, listing.expires
                );
                for (name, version, hardware) in &listing.images {
                    println!("{version:<12} {name}  ({})", hardware.join(", "));
                }
            }
        }
    }
    Ok(())
}
