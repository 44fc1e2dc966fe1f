//! The inventory: hosts, what they hold, and the index that makes a placement cheap.
//!
//! The index keeps, per (region, driver), the ready hosts ordered by free memory (most first,
//! then by slot). A placement walks the candidate buckets of its request in that order:
//! - the walk stops at the first host whose free memory is below the request's need: every host
//!   after it has less, so none of them can pass the memory hard cap;
//! - every host visited is checked against every constraint, so the index only decides the
//!   order of the walk, never whether a host fits;
//! - the score is (instances of the request's group on the host, fewest first; free memory after
//!   placement, most first; slot). Per group and bucket the inventory counts how many ready hosts
//!   hold exactly k instances of the group, which gives the lowest count any candidate can have
//!   (0 while some host of the bucket holds none) without visiting hosts. The first visited host
//!   that fits with that lowest count is the best there is, and the walk ends there. Otherwise
//!   the walk goes on to the end of the hosts with enough memory and keeps the best;
//! - when a group covers every host of a bucket (lowest count ≥ 1, a group larger than its
//!   bucket), the walk would pass every host that already got one more instance this round; so
//!   per such group and bucket a *floor* keeps the hosts with the lowest count by free memory,
//!   and the placement walks the floors first (the first host there that fits is the best).
//!   Only if none fits does it walk the buckets.
//!
//! So the index gives exactly the host a scan of every host would give ([`Inventory::explain`]
//! is that scan; a property test checks both agree, with hosts changing state and instances
//! coming and going). The cost is the number of hosts visited: small, unless the hosts with the
//! lowest count of the group and the most free memory fail the CPU or volume-space check.
//! Keeping a floor costs a rebuild (a pass over the group's hosts) each time its level rises,
//! about once per round of the group over its bucket.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use kiln_types::{HostId, MiB};

use crate::model::{
    Constraint, Driver, Group, Host, HostState, NoFit, Policy, Region, Request, Volumes,
    INSTANCE_OVERHEAD,
};

/// Index of a host in the inventory (stable for the inventory's life).
type Slot = u32;

/// What one instance takes from its host (for instances placed before this inventory existed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub group: Group,
    /// The instance's memory, without the overhead (the inventory adds it).
    pub memory: MiB,
    pub cpu: kiln_types::MilliCpu,
    /// Volume space it holds on the host.
    pub disk: MiB,
}

/// A host with what it holds.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) host: Host,
    pub(crate) used_memory: u64,
    pub(crate) used_cpu: u64,
    pub(crate) used_disk: u64,
    pub(crate) instances: u32,
    /// CPU that may be promised: `cpu × oversubscription`.
    pub(crate) cpu_limit: u64,
    /// The bucket this host is indexed in, when ready.
    bucket: Option<u32>,
    /// Groups with at least one instance here.
    groups: Vec<GroupIdx>,
}

impl Entry {
    fn free_memory(&self) -> u64 {
        self.host.memory.0.saturating_sub(self.used_memory)
    }
}

/// A group, interned.
type GroupIdx = u32;

/// Hashes the inventory's own integer keys (slots, groups, buckets) with one multiply (the
/// Fx hash), where SipHash's defence against chosen keys buys nothing: no such key comes from
/// outside.
#[derive(Default, Clone, Copy)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// A map keyed by slot, group or bucket.
pub(crate) type IntMap<V> = HashMap<u32, V, BuildHasherDefault<IntHasher>>;

/// Where one group's instances are.
#[derive(Default)]
pub(crate) struct GroupData {
    /// Instances per host.
    pub(crate) counts: IntMap<u32>,
    /// Per bucket: `levels[k - 1]` = ready hosts of the bucket holding exactly k instances of
    /// the group. The lowest count in a bucket follows without visiting its hosts.
    levels: IntMap<Vec<u32>>,
    /// Per bucket where every ready host holds at least one instance of the group: the hosts
    /// holding the lowest count, by free memory. Kept whole by every change to the group's
    /// hosts; used only while its level is still the bucket's lowest count.
    floors: IntMap<Floor>,
}

/// The hosts of one bucket that hold exactly `level` instances of a group.
struct Floor {
    level: u32,
    hosts: BTreeSet<(Reverse<u64>, Slot)>,
}

struct Bucket {
    /// Ready hosts ordered by free memory, most first; ties by slot.
    by_free: BTreeSet<(Reverse<u64>, Slot)>,
}

/// Hosts, their usage and the placement index. Build one per reconcile pass from the views (or
/// keep one and feed it every change), then place.
pub struct Inventory {
    policy: Policy,
    entries: Vec<Entry>,
    slots: HashMap<HostId, Slot>,
    buckets: Vec<Bucket>,
    bucket_of: HashMap<(Region, Driver), u32>,
    /// Buckets of each region with their driver, in the order they were created.
    region_buckets: HashMap<Region, Vec<(Driver, u32)>>,
    group_idx: HashMap<Group, GroupIdx>,
    groups: Vec<GroupData>,
}

/// Placing `count` instances of one request, one after another.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// The host of each instance placed, in order.
    pub hosts: Vec<HostId>,
    /// When fewer than asked were placed: how many are missing and why the next did not fit.
    pub shortfall: Option<(u32, NoFit)>,
}

impl Inventory {
    /// An inventory of `hosts` (ordered by id, which fixes the tie-breaks), none holding anything.
    pub fn new(mut hosts: Vec<Host>, policy: Policy) -> Self {
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        let mut inv = Self {
            policy,
            entries: Vec::with_capacity(hosts.len()),
            slots: HashMap::with_capacity(hosts.len()),
            buckets: Vec::new(),
            bucket_of: HashMap::new(),
            region_buckets: HashMap::new(),
            group_idx: HashMap::new(),
            groups: Vec::new(),
        };
        for h in hosts {
            inv.add_host(h);
        }
        inv
    }

    /// Adds a host (holding nothing yet). A host already known is replaced by the new
    /// description, keeping what it holds.
    pub fn add_host(&mut self, host: Host) {
        if let Some(&slot) = self.slots.get(&host.id) {
            self.leave(slot);
            let cpu_limit = cpu_limit(&host, &self.policy);
            let e = &mut self.entries[slot as usize];
            e.host = host;
            e.cpu_limit = cpu_limit;
            self.join(slot);
            return;
        }
        let slot = self.entries.len() as Slot;
        self.slots.insert(host.id.clone(), slot);
        self.entries.push(Entry {
            cpu_limit: cpu_limit(&host, &self.policy),
            host,
            used_memory: 0,
            used_cpu: 0,
            used_disk: 0,
            instances: 0,
            bucket: None,
            groups: Vec::new(),
        });
        self.join(slot);
    }

    /// Changes a host's state; returns false for an unknown host.
    pub fn set_state(&mut self, host: &HostId, state: HostState) -> bool {
        let Some(&slot) = self.slots.get(host) else {
            return false;
        };
        self.leave(slot);
        self.entries[slot as usize].host.state = state;
        self.join(slot);
        true
    }

    /// Records an instance already on `host` (from the views). Usage may exceed a host's
    /// capacity here (the inventory reflects what is, not what it would allow). Returns false
    /// for an unknown host.
    pub fn add_instance(&mut self, host: &HostId, usage: &Usage) -> bool {
        let Some(&slot) = self.slots.get(host) else {
            return false;
        };
        self.commit(
            slot,
            &usage.group,
            usage.memory.0 + INSTANCE_OVERHEAD.0,
            u64::from(usage.cpu.0),
            usage.disk.0,
        );
        true
    }

    /// Forgets an instance recorded on `host` (stopped, moved). Returns false for an unknown
    /// host.
    pub fn remove_instance(&mut self, host: &HostId, usage: &Usage) -> bool {
        let Some(&slot) = self.slots.get(host) else {
            return false;
        };
        let memory = usage.memory.0 + INSTANCE_OVERHEAD.0;
        self.reposition(slot, |e| {
            e.used_memory = e.used_memory.saturating_sub(memory);
            e.used_cpu = e.used_cpu.saturating_sub(u64::from(usage.cpu.0));
            e.used_disk = e.used_disk.saturating_sub(usage.disk.0);
            e.instances = e.instances.saturating_sub(1);
        });
        if let Some(&g) = self.group_idx.get(&usage.group) {
            let before = self.groups[g as usize]
                .counts
                .get(&slot)
                .copied()
                .unwrap_or(0);
            if before > 0 {
                self.set_count(slot, g, before, before - 1);
            }
        }
        true
    }

    /// The host `req` would go to, without recording it; or why none fits.
    pub fn choose(&self, req: &Request) -> Result<HostId, NoFit> {
        match self.best(req) {
            Some(slot) => Ok(self.entries[slot as usize].host.id.clone()),
            None => Err(self.no_fit(req)),
        }
    }

    /// Places one instance: picks its host and records the instance there, so the next placement
    /// sees it (one pass never overcommits).
    pub fn place(&mut self, req: &Request) -> Result<HostId, NoFit> {
        let Some(slot) = self.best(req) else {
            return Err(self.no_fit(req));
        };
        self.commit(
            slot,
            &req.group,
            req.memory_with_overhead(),
            u64::from(req.cpu.0),
            req.new_disk(),
        );
        Ok(self.entries[slot as usize].host.id.clone())
    }

    /// Places `count` instances of `req` one after another, each seeing the ones before (so they
    /// spread over hosts by the group rule). Stops at the first that does not fit: the inventory
    /// only fills up, so the rest would not fit either.
    pub fn place_many(&mut self, req: &Request, count: u32) -> Batch {
        let mut batch = Batch {
            hosts: Vec::with_capacity(count as usize),
            shortfall: None,
        };
        for placed in 0..count {
            match self.place(req) {
                Ok(h) => batch.hosts.push(h),
                Err(nofit) => {
                    batch.shortfall = Some((count - placed, nofit));
                    break;
                }
            }
        }
        batch
    }

    /// Places `count` instances in each of `regions` (a group's `scale.count` per region):
    /// `req` with its region replaced, one region after another. Regions share no host, so one
    /// region's shortfall does not change another's placements. Returns one batch per region,
    /// in the order given.
    pub fn place_per_region(
        &mut self,
        req: &Request,
        regions: &[Region],
        count: u32,
    ) -> Vec<Batch> {
        let mut r = req.clone();
        regions
            .iter()
            .map(|region| {
                r.region = region.clone();
                self.place_many(&r, count)
            })
            .collect()
    }

    /// Hosts known, ready or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Memory used on `host` (instances plus their overhead).
    pub fn used_memory(&self, host: &HostId) -> Option<MiB> {
        self.slots
            .get(host)
            .map(|&s| MiB(self.entries[s as usize].used_memory))
    }

    /// Instances of `group` recorded on `host`.
    pub fn group_count(&self, host: &HostId, group: &Group) -> u32 {
        self.slots
            .get(host)
            .and_then(|s| {
                let g = self.group_idx.get(group)?;
                self.groups[*g as usize].counts.get(s).copied()
            })
            .unwrap_or(0)
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn group_counts(&self, group: &Group) -> Option<&IntMap<u32>> {
        self.group_idx
            .get(group)
            .map(|g| &self.groups[*g as usize].counts)
    }

    pub(crate) fn slot_of(&self, host: &HostId) -> Option<Slot> {
        self.slots.get(host).copied()
    }

    /// The first constraint `e` fails for `req`, if any; the single source of truth for the
    /// index walk, the explanation and the no-fit count.
    pub(crate) fn check(
        &self,
        slot: Slot,
        req: &Request,
        pinned: Option<Slot>,
    ) -> Option<Constraint> {
        let e = &self.entries[slot as usize];
        match e.host.state {
            HostState::Down => return Some(Constraint::HostDown),
            // A draining host keeps what its volumes pin to it: volumes do not move, so the
            // replacement of such an instance (a redeploy, a restart) goes back to its volume.
            HostState::Draining if pinned != Some(slot) => return Some(Constraint::HostDraining),
            HostState::Draining => {}
            HostState::Ready => {}
        }
        if e.host.region != req.region {
            return Some(Constraint::Region);
        }
        if !req.drivers.is_empty() && !req.drivers.contains(&e.host.driver) {
            return Some(Constraint::Driver);
        }
        if matches!(req.volumes, Volumes::Existing { .. }) && pinned != Some(slot) {
            return Some(Constraint::VolumeLocality);
        }
        self.check_capacity(e, req)
    }

    /// The capacity constraints alone (memory, CPU, disk).
    fn check_capacity(&self, e: &Entry, req: &Request) -> Option<Constraint> {
        if e.free_memory() < req.memory_with_overhead() {
            return Some(Constraint::Memory);
        }
        if e.used_cpu + u64::from(req.cpu.0) > e.cpu_limit {
            return Some(Constraint::Cpu);
        }
        let disk = req.new_disk();
        if disk > 0 && e.used_disk + disk > e.host.disk.0 {
            return Some(Constraint::Disk);
        }
        None
    }

    /// The host an existing volume pins the request to, if the request has one and the host is
    /// known.
    pub(crate) fn pinned(&self, req: &Request) -> Option<Slot> {
        match &req.volumes {
            Volumes::Existing { host } => self.slot_of(host),
            _ => None,
        }
    }

    /// The score of a fitting host: lower is better.
    pub(crate) fn score(
        &self,
        slot: Slot,
        counts: Option<&IntMap<u32>>,
        need: u64,
    ) -> (u32, Reverse<u64>, Slot) {
        let same = counts.and_then(|c| c.get(&slot)).copied().unwrap_or(0);
        let free_after = self.entries[slot as usize].free_memory() - need;
        (same, Reverse(free_after), slot)
    }

    /// The best host for `req` through the index, or None.
    fn best(&self, req: &Request) -> Option<Slot> {
        let need = req.memory_with_overhead();
        let gidx = self.group_idx.get(&req.group).copied();
        let counts = gidx.map(|g| &self.groups[g as usize].counts);
        if let Volumes::Existing { .. } = req.volumes {
            let slot = self.pinned(req)?;
            return self.check(slot, req, Some(slot)).is_none().then_some(slot);
        }
        // Candidate buckets: the request's region, its drivers (or all of them).
        let candidates: Vec<u32> = self
            .region_buckets
            .get(&req.region)
            .into_iter()
            .flatten()
            .filter(|(d, _)| req.drivers.is_empty() || req.drivers.contains(d))
            .map(|(_, b)| *b)
            .collect();
        let mut walks: Vec<_> = candidates
            .iter()
            .map(|&b| self.buckets[b as usize].by_free.iter().peekable())
            .collect();
        // No candidate can hold fewer instances of the group than the lowest count in its
        // bucket: a fitting host with that count ends the walk.
        let floor = match gidx {
            None => 0,
            Some(g) => candidates
                .iter()
                .map(|&b| self.lowest_count(g, b))
                .min()
                .unwrap_or(0),
        };
        if floor > 0 {
            if let Some(slot) = self.best_on_floor(req, gidx, &candidates, floor, need) {
                return Some(slot);
            }
        }
        let mut best: Option<(u32, Slot)> = None;
        loop {
            // Merge the buckets: next host by (most free memory, lowest slot).
            let mut next: Option<(usize, (Reverse<u64>, Slot))> = None;
            for (i, w) in walks.iter_mut().enumerate() {
                if let Some(&&k) = w.peek() {
                    if next.is_none_or(|(_, n)| k < n) {
                        next = Some((i, k));
                    }
                }
            }
            let Some((i, (Reverse(free), slot))) = next else {
                break;
            };
            walks[i].next();
            if free < need {
                // Sorted by free memory: nothing after this host can pass the hard cap.
                break;
            }
            let e = &self.entries[slot as usize];
            if self.check_capacity(e, req).is_some() {
                continue;
            }
            let same = counts.and_then(|c| c.get(&slot)).copied().unwrap_or(0);
            if same <= floor {
                return Some(slot);
            }
            if best.is_none_or(|(b, _)| same < b) {
                best = Some((same, slot));
            }
        }
        best.map(|(_, s)| s)
    }

    /// When every candidate bucket is covered by the group (lowest count `floor` ≥ 1): the best
    /// host among those holding `floor` instances, walked from their floors by free memory.
    /// `None` when none of them fits or a floor is not usable: the caller then walks the buckets
    /// (which finds hosts of higher counts too).
    fn best_on_floor(
        &self,
        req: &Request,
        gidx: Option<GroupIdx>,
        candidates: &[u32],
        floor: u32,
        need: u64,
    ) -> Option<Slot> {
        let data = &self.groups[gidx? as usize];
        let mut walks = Vec::with_capacity(candidates.len());
        for &b in candidates {
            if self.lowest_count(gidx?, b) != floor {
                continue;
            }
            match data.floors.get(&b) {
                Some(f) if f.level == floor => walks.push(f.hosts.iter().peekable()),
                _ => return None,
            }
        }
        loop {
            let mut next: Option<(usize, (Reverse<u64>, Slot))> = None;
            for (i, w) in walks.iter_mut().enumerate() {
                if let Some(&&k) = w.peek() {
                    if next.is_none_or(|(_, n)| k < n) {
                        next = Some((i, k));
                    }
                }
            }
            let (i, (Reverse(free), slot)) = next?;
            walks[i].next();
            if free < need {
                return None;
            }
            if self
                .check_capacity(&self.entries[slot as usize], req)
                .is_none()
            {
                return Some(slot);
            }
        }
    }

    /// Counts, per constraint, why no host fits `req` (a scan of every host; only on failure).
    fn no_fit(&self, req: &Request) -> NoFit {
        let pinned = self.pinned(req);
        let mut nofit = NoFit::default();
        for slot in 0..self.entries.len() as Slot {
            if let Some(c) = self.check(slot, req, pinned) {
                *nofit.by_constraint.entry(c).or_default() += 1;
            }
        }
        nofit
    }

    fn commit(&mut self, slot: Slot, group: &Group, memory: u64, cpu: u64, disk: u64) {
        self.reposition(slot, |e| {
            e.used_memory += memory;
            e.used_cpu += cpu;
            e.used_disk += disk;
            e.instances += 1;
        });
        let g = match self.group_idx.get(group) {
            Some(&g) => g,
            None => {
                let g = self.groups.len() as GroupIdx;
                self.groups.push(GroupData::default());
                self.group_idx.insert(group.clone(), g);
                g
            }
        };
        let before = self.groups[g as usize]
            .counts
            .get(&slot)
            .copied()
            .unwrap_or(0);
        self.set_count(slot, g, before, before + 1);
    }

    /// Sets the instances of group `g` on `slot` from `before` to `after`, keeping the host's
    /// group list and the bucket's levels in step.
    fn set_count(&mut self, slot: Slot, g: GroupIdx, before: u32, after: u32) {
        let data = &mut self.groups[g as usize];
        let e = &mut self.entries[slot as usize];
        if after == 0 {
            data.counts.remove(&slot);
            e.groups.retain(|x| *x != g);
        } else {
            data.counts.insert(slot, after);
            if before == 0 {
                e.groups.push(g);
            }
        }
        if let Some(b) = e.bucket {
            move_level(data.levels.entry(b).or_default(), before, after);
            self.fix_floor(g, b, slot);
        }
    }

    /// Brings group `g`'s floor in bucket `b` up to date after a change to `slot` (its count,
    /// its membership of the bucket).
    fn fix_floor(&mut self, g: GroupIdx, b: u32, slot: Slot) {
        let lowest = self.lowest_count(g, b);
        let data = &mut self.groups[g as usize];
        if lowest == 0 {
            data.floors.remove(&b);
            return;
        }
        let e = &self.entries[slot as usize];
        match data.floors.get_mut(&b) {
            Some(floor) if floor.level == lowest => {
                let key = (Reverse(e.free_memory()), slot);
                let count = data.counts.get(&slot).copied().unwrap_or(0);
                if e.bucket == Some(b) && count == lowest {
                    floor.hosts.insert(key);
                } else {
                    floor.hosts.remove(&key);
                }
            }
            _ => {
                let hosts = data
                    .counts
                    .iter()
                    .filter(|&(&s, &n)| n == lowest && self.entries[s as usize].bucket == Some(b))
                    .map(|(&s, _)| (Reverse(self.entries[s as usize].free_memory()), s))
                    .collect();
                data.floors.insert(
                    b,
                    Floor {
                        level: lowest,
                        hosts,
                    },
                );
            }
        }
    }

    /// The lowest number of instances of group `g` on a host of bucket `b`.
    fn lowest_count(&self, g: GroupIdx, b: u32) -> u32 {
        let size = self.buckets[b as usize].by_free.len() as u32;
        let Some(levels) = self.groups[g as usize].levels.get(&b) else {
            return 0;
        };
        if levels.iter().sum::<u32>() < size {
            return 0;
        }
        levels
            .iter()
            .position(|n| *n > 0)
            .map_or(0, |k| k as u32 + 1)
    }

    /// Changes a host's usage, keeping its place in its bucket's order.
    fn reposition(&mut self, slot: Slot, change: impl FnOnce(&mut Entry)) {
        let e = &mut self.entries[slot as usize];
        let Some(b) = e.bucket else {
            change(e);
            return;
        };
        let set = &mut self.buckets[b as usize].by_free;
        let old = (Reverse(e.free_memory()), slot);
        set.remove(&old);
        change(e);
        let new = (Reverse(e.free_memory()), slot);
        set.insert(new);
        // The floors holding this host follow its free memory too.
        for &g in &e.groups {
            let data = &mut self.groups[g as usize];
            if let Some(floor) = data.floors.get_mut(&b) {
                if floor.hosts.remove(&old) {
                    floor.hosts.insert(new);
                }
            }
        }
    }

    /// Indexes a ready host in its (region, driver) bucket.
    fn join(&mut self, slot: Slot) {
        let e = &self.entries[slot as usize];
        if e.host.state != HostState::Ready || e.bucket.is_some() {
            return;
        }
        let key = (e.host.region.clone(), e.host.driver.clone());
        let b = match self.bucket_of.get(&key) {
            Some(&b) => b,
            None => {
                let b = self.buckets.len() as u32;
                self.buckets.push(Bucket {
                    by_free: BTreeSet::new(),
                });
                self.region_buckets
                    .entry(key.0.clone())
                    .or_default()
                    .push((key.1.clone(), b));
                self.bucket_of.insert(key, b);
                b
            }
        };
        let e = &mut self.entries[slot as usize];
        e.bucket = Some(b);
        self.buckets[b as usize]
            .by_free
            .insert((Reverse(e.free_memory()), slot));
        for &g in &e.groups {
            let data = &mut self.groups[g as usize];
            let n = data.counts[&slot];
            move_level(data.levels.entry(b).or_default(), 0, n);
        }
        for g in self.entries[slot as usize].groups.clone() {
            self.fix_floor(g, b, slot);
        }
    }

    /// Takes a host out of the index (it stops being ready, or changes bucket).
    fn leave(&mut self, slot: Slot) {
        let e = &mut self.entries[slot as usize];
        let Some(b) = e.bucket.take() else {
            return;
        };
        self.buckets[b as usize]
            .by_free
            .remove(&(Reverse(e.free_memory()), slot));
        for &g in &e.groups {
            let data = &mut self.groups[g as usize];
            let n = data.counts[&slot];
            move_level(data.levels.entry(b).or_default(), n, 0);
        }
        for g in self.entries[slot as usize].groups.clone() {
            self.fix_floor(g, b, slot);
        }
    }
}

/// Moves one host from level `before` to level `after` (level 0 is not stored).
fn move_level(levels: &mut Vec<u32>, before: u32, after: u32) {
    if before > 0 {
        levels[before as usize - 1] -= 1;
    }
    if after > 0 {
        if levels.len() < after as usize {
            levels.resize(after as usize, 0);
        }
        levels[after as usize - 1] += 1;
    }
}

fn cpu_limit(host: &Host, policy: &Policy) -> u64 {
    (f64::from(host.cpu.0) * policy.cpu_oversubscription).floor() as u64
}
