//! The process exit codes of the command line contract, defined once for the command line and
//! the run report.

/// Success, or nothing to do.
pub const EXIT_OK: i32 = 0;
/// A run failed and was rolled back (the old credential is in place and works), or drift.
pub const EXIT_FAILED: i32 = 1;
/// A configuration or usage error; nothing was changed.
pub const EXIT_USAGE: i32 = 2;
/// A rollback failed: a person must act.
pub const EXIT_ROLLBACK_FAILED: i32 = 3;
/// Could not start (lock held, journal unreachable) or the run lost its lock.
pub const EXIT_CANNOT_START: i32 = 4;
