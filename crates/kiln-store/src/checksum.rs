//! View checksums: a canonical digest of every row of every view table, equal on both backends
//! for equal contents, so that a rebuilt view can be proven equal to the live one.

use sha2::{Digest, Sha256};

use crate::error::DbError;
use crate::sql::Cols;
use crate::views::{Kind, ViewTable};

/// The digest of one view table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewChecksum {
    pub view: &'static str,
    pub rows: u64,
    /// SHA-256 over the rows in key order, hex.
    pub sha256: String,
}

/// Accumulates one table's rows.
pub(crate) struct TableHasher {
    table: &'static ViewTable,
    hasher: Sha256,
    rows: u64,
}

impl TableHasher {
    pub(crate) fn new(table: &'static ViewTable) -> Self {
        TableHasher {
            table,
            hasher: Sha256::new(),
            rows: 0,
        }
    }

    /// Adds one row read with `ViewTable::select_all`. Every value is tagged and
    /// length-prefixed, so no two different rows hash the same bytes.
    pub(crate) fn row(&mut self, r: &dyn Cols) -> Result<(), DbError> {
        for (i, (_, kind)) in self.table.cols.iter().enumerate() {
            match kind {
                Kind::Text => match r.opt_text(i)? {
                    None => self.hasher.update(b"N"),
                    Some(s) => {
                        self.hasher.update(b"T");
                        self.hasher.update((s.len() as u64).to_le_bytes());
                        self.hasher.update(s.as_bytes());
                    }
                },
                Kind::Int => match r.opt_int(i)? {
                    None => self.hasher.update(b"N"),
                    Some(v) => {
                        self.hasher.update(b"I");
                        self.hasher.update(v.to_le_bytes());
                    }
                },
                Kind::Bool => {
                    self.hasher
                        .update(if r.boolean(i)? { b"B1" } else { b"B0" });
                }
            }
        }
        self.hasher.update(b"\n");
        self.rows += 1;
        Ok(())
    }

    pub(crate) fn finish(self) -> ViewChecksum {
        ViewChecksum {
            view: self.table.name,
            rows: self.rows,
            sha256: hex::encode(self.hasher.finalize()),
        }
    }
}

/// The outcome of `views rebuild`: the live views against views replayed from the log into
/// fresh tables, both as of the same log head.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    /// The log head both sides reflect.
    pub head: u64,
    /// Events replayed.
    pub events: u64,
    pub live: Vec<ViewChecksum>,
    pub rebuilt: Vec<ViewChecksum>,
    /// True when the live views were replaced by the rebuilt ones.
    pub replaced: bool,
    pub elapsed: std::time::Duration,
}

impl RebuildReport {
    /// Whether every live view equals its rebuilt twin.
    pub fn is_equal(&self) -> bool {
        self.live == self.rebuilt
    }
}
