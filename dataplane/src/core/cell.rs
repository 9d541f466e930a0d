//! [`PlainCell`]: the simplest [`SessionCell`], a shared session with no
//! connection attached; used by the core's tests and the simulation harness.

use std::sync::Arc;

use parking_lot::Mutex;

use super::table::SessionCell;
use crate::session::{Session, SessionIdentity};

/// A session behind a mutex, shared by clones.
#[derive(Debug, Clone)]
pub struct PlainCell(Arc<(SessionIdentity, Mutex<Session>)>);

impl PlainCell {
    pub fn new(session: Session) -> Self {
        Self(Arc::new((session.identity().clone(), Mutex::new(session))))
    }
}

impl SessionCell for PlainCell {
    fn identity(&self) -> &SessionIdentity {
        &self.0.0
    }

    fn with<R>(&self, f: impl FnOnce(&mut Session) -> R) -> R {
        f(&mut self.0.1.lock())
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
