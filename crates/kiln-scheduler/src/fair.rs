//! Fairness: which of a reconcile pass's actions go out now.
//!
//! A pass may want thousands of placements and stops (one org deploys 10,000 instances while
//! another starts one). [`FairQueue`] admits at most [`Limits::per_pass`] of them, at most
//! [`Limits::per_org`] per org (minus what the org already has in flight), and shares them between
//! orgs by deficit round robin: each round every org with work earns one unit of credit and
//! spends it on its next actions in the order it pushed them (an action costs 1 unless pushed
//! with a weight). With unit costs that is plain round robin: orgs with work left after a pass
//! got the same number of actions, give or take one.
//!
//! Rounds start after the org named by the caller (the last one served by the previous pass,
//! [`Taken::last`]), so when there are more orgs than actions per pass every org gets its turn
//! within a bounded number of passes. Nothing else is kept between passes: actions not admitted
//! are dropped, and the next (level-triggered) pass computes them again.

use std::collections::{BTreeMap, VecDeque};

use kiln_types::OrgId;

/// Bounds of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Actions admitted per pass, all orgs together.
    pub per_pass: u32,
    /// Actions one org may have in flight (admitted this pass plus already in flight).
    pub per_org: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_pass: 1000,
            per_org: 250,
        }
    }
}

struct OrgQueue<T> {
    items: VecDeque<(u32, T)>,
    in_flight: u32,
    deficit: u64,
}

impl<T> Default for OrgQueue<T> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            in_flight: 0,
            deficit: 0,
        }
    }
}

/// One pass's actions, per org, waiting to be admitted.
pub struct FairQueue<T> {
    limits: Limits,
    orgs: BTreeMap<OrgId, OrgQueue<T>>,
}

/// What [`FairQueue::take`] admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken<T> {
    /// In the order to apply them.
    pub admitted: Vec<(OrgId, T)>,
    /// Actions left for a later pass.
    pub deferred: usize,
    /// The org served last: pass it to the next pass's `take`.
    pub last: Option<OrgId>,
}

impl<T> FairQueue<T> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            orgs: BTreeMap::new(),
        }
    }

    /// Queues an action of cost 1 for `org`.
    pub fn push(&mut self, org: &OrgId, item: T) {
        self.push_weighted(org, 1, item);
    }

    /// Queues an action that costs `cost` units of the org's share (at least 1).
    pub fn push_weighted(&mut self, org: &OrgId, cost: u32, item: T) {
        self.org(org).items.push_back((cost.max(1), item));
    }

    /// Records that `org` already has `n` actions in flight (started by earlier passes, not
    /// finished): they count against [`Limits::per_org`].
    pub fn set_in_flight(&mut self, org: &OrgId, n: u32) {
        self.org(org).in_flight = n;
    }

    /// Actions queued.
    pub fn len(&self) -> usize {
        self.orgs.values().map(|o| o.items.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits actions: rounds over the orgs, starting after `after`, until the pass's budget is
    /// spent or no org can take more.
    pub fn take(mut self, after: Option<&OrgId>) -> Taken<T> {
        let mut ring: Vec<OrgId> = Vec::with_capacity(self.orgs.len());
        if let Some(a) = after {
            use std::ops::Bound::{Excluded, Unbounded};
            ring.extend(
                self.orgs
                    .range((Excluded(a), Unbounded))
                    .map(|(k, _)| k.clone()),
            );
            ring.extend(self.orgs.range(..=a).map(|(k, _)| k.clone()));
        } else {
            ring.extend(self.orgs.keys().cloned());
        }
        let per_org = self.limits.per_org;
        let can_take = |o: &OrgQueue<T>| !o.items.is_empty() && o.in_flight < per_org;
        let mut admitted = Vec::new();
        let mut last = None;
        let budget = self.limits.per_pass as usize;
        'rounds: while admitted.len() < budget {
            let mut any = false;
            for org in &ring {
                let q = self.orgs.get_mut(org).expect("ring lists known orgs");
                if !can_take(q) {
                    continue;
                }
                any = true;
                q.deficit += 1;
                while let Some(&(cost, _)) = q.items.front() {
                    if u64::from(cost) > q.deficit || q.in_flight >= per_org {
                        break;
                    }
                    let (_, item) = q.items.pop_front().expect("front exists");
                    q.deficit -= u64::from(cost);
                    q.in_flight += 1;
                    admitted.push((org.clone(), item));
                    last = Some(org.clone());
                    if admitted.len() >= budget {
                        break 'rounds;
                    }
                }
                if q.items.is_empty() {
                    q.deficit = 0;
                }
            }
            if !any {
                break;
            }
        }
        Taken {
            admitted,
            deferred: self.len(),
            last,
        }
    }

    fn org(&mut self, org: &OrgId) -> &mut OrgQueue<T> {
        if !self.orgs.contains_key(org) {
            self.orgs.insert(org.clone(), OrgQueue::default());
        }
        self.orgs.get_mut(org).expect("inserted above")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn org(n: u64) -> OrgId {
        format!("org_{n:020}").parse().unwrap()
    }

    #[test]
    fn a_huge_deploy_does_not_starve_a_single_instance() {
        let mut q = FairQueue::new(Limits {
            per_pass: 100,
            per_org: 10_000,
        });
        for i in 0..10_000 {
            q.push(&org(1), i);
        }
        q.push(&org(2), 0);
        let taken = q.take(None);
        assert_eq!(taken.admitted.len(), 100);
        assert_eq!(taken.admitted[1], (org(2), 0), "served in the first round");
        assert_eq!(
            taken.admitted.iter().filter(|(o, _)| *o == org(1)).count(),
            99
        );
        assert_eq!(taken.deferred, 10_000 - 99);
        // The big org's actions go out in the order it pushed them.
        let firsts: Vec<i32> = taken
            .admitted
            .iter()
            .filter(|(o, _)| *o == org(1))
            .map(|(_, i)| *i)
            .take(3)
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }

    #[test]
    fn per_org_limit_counts_what_is_in_flight() {
        let mut q = FairQueue::new(Limits {
            per_pass: 100,
            per_org: 5,
        });
        for i in 0..10 {
            q.push(&org(1), i);
            q.push(&org(2), i);
        }
        q.set_in_flight(&org(1), 3);
        let taken = q.take(None);
        let count = |n| taken.admitted.iter().filter(|(o, _)| *o == org(n)).count();
        assert_eq!((count(1), count(2)), (2, 5));
        assert_eq!(taken.deferred, 13);
    }

    #[test]
    fn rounds_rotate_between_passes_so_every_org_gets_a_turn() {
        let limits = Limits {
            per_pass: 2,
            per_org: 100,
        };
        let mut last = None;
        let mut served = BTreeMap::new();
        for _pass in 0..3 {
            let mut q = FairQueue::new(limits);
            for n in 0..6 {
                q.push(&org(n), n);
            }
            let taken = q.take(last.as_ref());
            for (o, _) in &taken.admitted {
                *served.entry(o.clone()).or_insert(0) += 1;
            }
            last = taken.last;
        }
        assert_eq!(served.len(), 6, "six orgs, two per pass, three passes");
    }

    #[test]
    fn weights_share_by_cost() {
        let mut q = FairQueue::new(Limits {
            per_pass: 12,
            per_org: 100,
        });
        for i in 0..20 {
            q.push_weighted(&org(1), 3, i);
            q.push(&org(2), i);
        }
        let taken = q.take(None);
        let count = |n| taken.admitted.iter().filter(|(o, _)| *o == org(n)).count();
        assert_eq!((count(1), count(2)), (3, 9));
    }

    proptest! {
        #[test]
        fn backlogged_orgs_get_equal_shares(
            sizes in prop::collection::vec(0..50usize, 1..8),
            per_pass in 1..120u32,
            start in 0..8u64,
        ) {
            let mut q = FairQueue::new(Limits { per_pass, per_org: u32::MAX });
            for (n, size) in sizes.iter().enumerate() {
                for i in 0..*size {
                    q.push(&org(n as u64), i);
                }
            }
            let total: usize = sizes.iter().sum();
            let taken = q.take(Some(&org(start)));
            prop_assert_eq!(taken.admitted.len(), total.min(per_pass as usize));
            prop_assert_eq!(taken.deferred, total - taken.admitted.len());
            let got = |n: usize| taken.admitted.iter().filter(|(o, _)| *o == org(n as u64)).count();
            // Any org with work left got at least as many as any other org, less one.
            for a in 0..sizes.len() {
                if got(a) < sizes[a] {
                    for b in 0..sizes.len() {
                        prop_assert!(got(b) <= got(a) + 1, "org {} got {}, org {} got {}", a, got(a), b, got(b));
                    }
                }
            }
        }
    }
}
