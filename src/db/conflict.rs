//! Conflict: one reason `migrate` refuses a database, in the terms an operator acts on.
//!
//! Why its own module: the plan ([`super::plan`]) and the adoption of the app's table
//! ([`super::adopt`]) both find conflicts, and the plan also reads the adoption's.

use std::fmt;

/// A reason `migrate` refuses: where, what is there, what the worker needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The table and column, type, extension, schema or role.
    pub place: String,
    /// What the database has there.
    pub found: String,
    /// What the worker needs there, and why or how.
    pub needed: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; needed: {}", self.place, self.found, self.needed)
    }
}
