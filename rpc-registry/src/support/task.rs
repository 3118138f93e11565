//! Task ownership: a spawned task lives exactly as long as its owner.

use std::fmt;

use tokio::task::JoinHandle;

/// Aborts the task when dropped, so a task cannot outlive whoever spawned it.
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Spawns `fut` on the current Tokio runtime; `None` outside of one
    /// (where `tokio::spawn` would panic).
    pub(crate) fn spawn<F>(fut: F) -> Option<Self>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(Self(runtime.spawn(fut)))
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl fmt::Debug for AbortOnDrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortOnDrop")
            .field("finished", &self.0.is_finished())
            .finish()
    }
}
