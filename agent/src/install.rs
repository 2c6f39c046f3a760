//! Installing an update: the signed bundle streamed into the slot that is not the default,
//! then one trial boot of it asked of the boot loader and the install recorded. Refused below
//! the floor and while a trial awaits its verdict; a download that fails verification
//! invalidates the slot, one cut by the network resumes where it stopped.

use crate::slots::{invalidate, Appliance, BootControl, Record, Slot};
use crate::update::{write_to_slot, Candidate, Progress, Resume, UpdateError};

impl<B: BootControl> Appliance<B> {
    /// Streams `candidate` into the slot that is not the default and asks for one trial boot
    /// of it. Refused below the floor. A failed download invalidates the slot.
    pub async fn install(
        &mut self,
        repo: &tough::Repository,
        candidate: &Candidate,
    ) -> Result<Slot, String> {
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
    ) -> Result<Slot, String> {
        self.install_with(repo, candidate, Some(fetcher)).await
    }

    async fn install_with(
        &mut self,
        repo: &tough::Repository,
        candidate: &Candidate,
        fetcher: Option<&crate::http::Fetcher>,
    ) -> Result<Slot, String> {
        let floor = self.floor.get()?;
        if candidate.version <= floor {
            return Err(format!(
                "version {} is not above the floor {floor} (rollback refused)",
                candidate.version
            ));
        }
        self.may_install()?;
        let state = self.boot.state().map_err(|e| e.to_string())?;
        let target = state.default.other();
        let path = self.slot_path(target);
        let progress = self.download_path();
        let resume = fetcher.map(|fetcher| Resume {
            fetcher,
            progress: &progress,
        });
        match write_to_slot(repo, candidate, path, resume).await {
            Ok(_) => {}
            Err(e @ UpdateError::Download(_)) if resume.is_some() => {
                let kept = Progress::load(&progress).map_or(0, |p| p.offset);
                return Err(format!(
                    "{e}; slot {target} keeps {kept} bytes, the next attempt resumes there"
                ));
            }
            Err(e) => {
                // Whatever landed is not the signed image: make sure nothing ever boots it
                // (a later `rollback --force` included). The boot state was never touched.
                let _ = std::fs::remove_file(&progress);
                return Err(match invalidate(path) {
                    Ok(()) => format!("{e}; slot {target} invalidated"),
                    Err(ie) => format!("{e}; slot {target} could not be invalidated: {ie}"),
                });
            }
        }
        self.boot.try_once(target).map_err(|e| e.to_string())?;
        crate::crash_point("trial-armed");
        self.save(&Record::Pending {
            version: candidate.version.to_string(),
            slot: target,
        })?;
        Ok(target)
    }
}
