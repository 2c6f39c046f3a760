//! Installing an update: the signed bundle streamed into the slot that is not the default,
//! then one trial boot of it asked of the boot loader and the install recorded. Refused below
//! the floor and while a trial awaits its verdict; a download that fails verification
//! invalidates the slot, one cut by the network resumes where it stopped.

use crate::slots::{invalidate, Appliance, BootControl, Record, Slot, SlotError};
use crate::update::{write_to_slot, Candidate, Progress, Resume, UpdateError};
use crate::version::Version;

/// Why an install did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error("version {version} is not above the floor {floor} (rollback refused)")]
    BelowFloor { version: Version, floor: Version },
    /// Cut by the network: what was written stays, for the next attempt.
    #[error("{source}; slot {slot} keeps {kept} bytes, the next attempt resumes there")]
    Interrupted {
        source: UpdateError,
        slot: Slot,
        kept: u64,
    },
    /// Not the signed image: the slot's head was zeroed so nothing ever boots it.
    #[error("{source}; slot {slot} invalidated")]
    Invalidated { source: UpdateError, slot: Slot },
    #[error("{source}; slot {slot} could not be invalidated: {error}")]
    NotInvalidated {
        source: UpdateError,
        slot: Slot,
        error: std::io::Error,
    },
}

impl<B: BootControl> Appliance<B> {
    /// Streams `candidate` into the slot that is not the default and asks for one trial boot
    /// of it. Refused below the floor. A failed download invalidates the slot.
    pub async fn install(
        &mut self,
        repo: &tough::Repository,
        candidate: &Candidate,
    ) -> Result<Slot, InstallError> {
        self.install_with(repo, candidate, None).await
    }

    /// Like [`Appliance::install`], but a download interrupted by the network (not one
    /// that failed verification) keeps what it wrote, and the next attempt at the same
    /// bundle resumes from the last durable point through `fetcher` (the repository's
    /// transport).
    pub async fn install_resumable(
        &mut self,
        repo: &tough::Repository,
        candidate: &Candidate,
        fetcher: &crate::http::Fetcher,
    ) -> Result<Slot, InstallError> {
        self.install_with(repo, candidate, Some(fetcher)).await
    }

    async fn install_with(
        &mut self,
        repo: &tough::Repository,
        candidate: &Candidate,
        fetcher: Option<&crate::http::Fetcher>,
    ) -> Result<Slot, InstallError> {
        let floor = self.floor.get()?;
        if candidate.version <= floor {
            return Err(InstallError::BelowFloor {
                version: candidate.version.clone(),
                floor,
            });
        }
        self.may_install()?;
        let state = self.boot.state().map_err(SlotError::from)?;
        let target = state.default.other();
        let path = self.slot_path(target);
        let progress = self.download_path();
        let resume = fetcher.map(|fetcher| Resume {
            fetcher,
            progress: &progress,
        });
        match write_to_slot(repo, candidate, path, resume).await {
            Ok(_) => {}
            Err(source @ UpdateError::Download(_)) if resume.is_some() => {
                let kept = Progress::load(&progress).map_or(0, |p| p.offset);
                return Err(InstallError::Interrupted {
                    source,
                    slot: target,
                    kept,
                });
            }
            Err(source) => {
                // Whatever landed is not the signed image: make sure nothing ever boots it
                // (a later `rollback --force` included). The boot state was never touched.
                let _ = std::fs::remove_file(&progress);
                return Err(match invalidate(path) {
                    Ok(()) => InstallError::Invalidated {
                        source,
                        slot: target,
                    },
                    Err(error) => InstallError::NotInvalidated {
                        source,
                        slot: target,
                        error,
                    },
                });
            }
        }
        self.boot.try_once(target).map_err(SlotError::from)?;
        crate::crash_point("trial-armed");
        self.save(&Record::Pending {
            version: candidate.version.to_string(),
            slot: target,
        })?;
        Ok(target)
    }
}
