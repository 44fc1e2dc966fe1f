//! Units that cross boundaries: memory in MiB, CPU in thousandths of a core.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Mebibytes of memory.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MiB(pub u64);

impl MiB {
    pub fn bytes(self) -> u64 {
        self.0.saturating_mul(1024 * 1024)
    }
}

impl fmt::Display for MiB {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

impl fmt::Debug for MiB {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MiB({})", self.0)
    }
}

/// CPU in thousandths of a core (1000 = one vCPU).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MilliCpu(pub u32);

impl MilliCpu {
    pub fn from_cpus(cpus: u32) -> Self {
        Self(cpus.saturating_mul(1000))
    }
}

impl fmt::Display for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

impl fmt::Debug for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MilliCpu({})", self.0)
    }
}
