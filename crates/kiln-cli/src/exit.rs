//! Exit codes, documented in docs/cli/04-errors-and-exit-codes.md. Scripts may rely on them.

/// Success.
pub const OK: i32 = 0;
/// Any failure not covered below.
pub const FAILURE: i32 = 1;
/// The command line itself is wrong (unknown flag, missing argument).
pub const USAGE: i32 = 2;
/// A local file (kiln.toml, the context file) is invalid.
pub const INVALID_CONFIG: i32 = 3;
/// The app, release or other resource does not exist (or belongs to another org).
pub const NOT_FOUND: i32 = 4;
/// No credentials, or the control plane refused them.
pub const AUTH: i32 = 5;
/// The deploy was created but did not become healthy; the previous release keeps serving.
pub const DEPLOY_FAILED: i32 = 6;
/// The control plane could not be reached.
pub const UNREACHABLE: i32 = 7;
/// The control plane refused the request as invalid (bad image reference, conflict, ...).
pub const REJECTED: i32 = 8;
/// `kiln domains verify`: DNS does not (yet) hold the domain's challenge record.
pub const NOT_VERIFIED: i32 = 9;
