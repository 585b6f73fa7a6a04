//! A LUKS header being calibrated and written on a thread of its own while
//! the copy into a new encrypted destination runs (`convert` to a LUKS
//! qcow2 or a raw LUKS1 volume). Its own module so that `create` and
//! `luks` both use it without reaching each other.

use crate::CliError;

/// The LUKS header of a new encrypted image being calibrated and
/// written on a thread of its own (`Qcow2Create::create_for_copy`,
/// `luks::create_for_convert`). The
/// volume key is drawn first, so data can be encrypted with it at once;
/// the header, written through a second handle to the file into the
/// region `create` reserved (which no data write touches), seals that key
/// in key slot 0. Dropping it waits for the thread.
pub(crate) struct PendingHeader {
    job: Option<std::thread::JoinHandle<Result<(), CliError>>>,
}

impl PendingHeader {
    /// Runs `write_header` (for the image at `path`) on a thread of its own.
    pub(crate) fn spawn(
        path: &str,
        write_header: impl FnOnce() -> Result<(), CliError> + Send + 'static,
    ) -> Result<Self, CliError> {
        let job = std::thread::Builder::new()
            .name("qimg-luks-header".into())
            .spawn(write_header)
            .map_err(|err| CliError::io(path, format!("cannot start a thread: {err}")))?;
        Ok(Self { job: Some(job) })
    }

    /// Waits until the header is written and durable; its error if not.
    pub(crate) fn finish(mut self) -> Result<(), CliError> {
        match self.job.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for PendingHeader {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = job.join();
        }
    }
}
