//! Per-pod user namespaces, in systemd's model (docs/UIDS-GIDS.md): every pod in a user namespace
//! gets a range of 65536 host ids of its own, its base a multiple of 65536, taken from a pool
//! that defaults to systemd's container range (bases 0x00080000..=0x6FFF0000); images stay in
//! the foreign range 0x7FFE0000..=0x7FFEFFFF and appear in the pod's range through idmapped
//! mounts. A kubelet that picks the range itself (KEP-127, `hostUsers: false`) sends it in the
//! CRI; it is used as is once checked.
//!
//! Ranges are recorded in the pod records (`Pod::userns`): on start the allocator is rebuilt from
//! them, so a restart keeps every pod's range and never hands one out twice. A range is released
//! only when its pod's record is gone.
//!
//! # User namespaces, end to end (KEP-127, systemd's UIDS-GIDS.md)
//!
//! Image layers are stored in systemd's foreign UID range (0x7FFE0000–0x7FFEFFFF,
//! `images.layer_uid_shift`); a container sees them through idmapped mounts of each layer
//! (`open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)`, used as overlayfs lowers): mapped to 0..65535
//! for pods without a user namespace, to the pod's range for pods with one. Nothing is chowned or
//! copied, whatever the image's size. overlayfs before Linux 6.8 refuses detached mounts as lowers,
//! so init attaches them first, as `0`, `1`, ... in a staging tmpfs mounted on the rootfs directory
//! in the container's mount namespace, mounts the overlay there from those relative names (128
//! layers take ~400 bytes of the one-page option limit), clones it, detaches the staging tmpfs with
//! everything in it and attaches the clone: overlayfs keeps its own private clones of its layers,
//! and the container's mount table shows only the overlay. One path for every kernel: on 6.18,
//! where overlayfs takes the detached mounts directly, that took as long
//! (CreateContainer+StartContainer 22–26 ms either way in `bench userns`, alternating builds;
//! commit 8297964).
//!
//! A pod with `userns_options` mode POD gets host ids of its own: the kubelet's mappings (at least
//! 65536 ids, taken as given like containerd does, never overlapping a range in use: the kubelet
//! sends 64K-aligned multiples of 65536, critest 1000..+100000) or a free 64K-aligned range of the `[userns]`
//! pool (systemd's container range 0x00080000–0x6FFFFFFF by default, ranges whose first id NSS
//! knows skipped; a bitmap; the NSS lookup of the next range is done in the background after each
//! allocation, so a pod start does not wait for it). The range is written in the pod record before
//! anything is made, rebuilt from the records on start, and freed only when the record is gone.
//!
//! The pod's user namespace is made by a child process (unshare of a user namespace needs a process
//! of its own; cloned with CLONE_VM, on a stack of its own, because a fork copying the daemon's
//! page tables cost ~1.6 ms a pod in `bench userns`, commit 39dae00; README has the figures), which
//! then creates the pod's net/ipc/uts namespaces inside it, so they belong to it; all four are
//! pinned.
//!
//! init mounts as the node's root (overlay with idmapped lowers, proc, sysfs, devpts, tmpfs owned
//! by the pod's root, idmapped volumes with the kubelet's `uid_mappings`), pivots, sets rlimits,
//! then joins the pod's user namespace and becomes its root before user, capabilities and exec:
//! capabilities are the pod's, not the node's. Right after joining it, init unshares a copy of its
//! mount namespace that the pod's user namespace owns (as runc's userns containers have): root in
//! the pod, given CAP_SYS_ADMIN, can mount what a user namespace may (tmpfs, binds of its own
//! files), while every mount init made comes along locked (no unmounting a masked path, no
//! remounting a read-only one writable). Not for containers with Bidirectional mounts (their
//! propagation needs the node's ownership). The per-container PID namespace stays the node user
//! namespace's. `exec-in` joins the container's mount namespace and then the same user namespace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The ids one pod's user namespace maps: a pod sees 0..65535 (uids and gids alike).
pub const RANGE_SIZE: u32 = 0x1_0000;

/// systemd's foreign UID range, where the image store keeps layer files: never a pod's.
pub const FOREIGN_BASE: u32 = 0x7FFE_0000;

/// The first base of systemd's container range for per-container 64K ranges.
const CONTAINER_RANGE_FIRST: u32 = 0x0008_0000;
/// The last base of systemd's container range (0x6FFF0000..=0x6FFFFFFF is its last range).
const CONTAINER_RANGE_LAST: u32 = 0x6FFF_0000;

/// The `[userns]` table of the daemon's config: the pool the daemon allocates pod ranges from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsernsConfig {
    /// First host id of the pool; a multiple of 65536, at least 65536. Default: 524288
    /// (0x00080000), the start of systemd's container range.
    pub pool_start: u32,
    /// Number of 65536-id ranges in the pool, one per pod in a user namespace. Default: 28664,
    /// up to 0x6FFFFFFF, the end of systemd's container range.
    pub pool_ranges: u32,
}

impl Default for UsernsConfig {
    fn default() -> Self {
        UsernsConfig {
            pool_start: CONTAINER_RANGE_FIRST,
            pool_ranges: (CONTAINER_RANGE_LAST - CONTAINER_RANGE_FIRST) / RANGE_SIZE + 1,
        }
    }
}

impl UsernsConfig {
    /// Checks the pool: aligned, not containing host ids 0..65535, within 32 bits, and clear of
    /// the foreign range and of the image store's layer range (`layer_uid_shift`, 0 for none).
    /// The error names the key at fault.
    pub fn validate(&self, layer_uid_shift: u32) -> Result<(), (&'static str, String)> {
        if !self.pool_start.is_multiple_of(RANGE_SIZE) || self.pool_start < RANGE_SIZE {
            return Err(("userns.pool_start", format!("{} is not a multiple of 65536 above 0", self.pool_start)));
        }
        if self.pool_ranges == 0 {
            return Err(("userns.pool_ranges", "the pool needs at least one range".into()));
        }
        let end = self.end();
        // The last 64K of the id space hold (uid_t)-1 and the overflow ids' neighbours.
        if end > u64::from(u32::MAX) + 1 - u64::from(RANGE_SIZE) {
            return Err((
                "userns.pool_ranges",
                format!("the pool from {} with {} ranges goes beyond 4294901760", self.pool_start, self.pool_ranges),
            ));
        }
        let mut reserved = vec![(FOREIGN_BASE, "the foreign id range of container images")];
        if layer_uid_shift != 0 && layer_uid_shift != FOREIGN_BASE {
            reserved.push((layer_uid_shift, "the id range of the image store's layers (images.layer_uid_shift)"));
        }
        for (base, what) in reserved {
            if u64::from(base) < end && u64::from(base) + u64::from(RANGE_SIZE) > u64::from(self.pool_start) {
                return Err((
                    "userns.pool_ranges",
                    format!("the pool {}..{} overlaps {what} at {base}", self.pool_start, end - 1),
                ));
            }
        }
        Ok(())
    }

    fn end(&self) -> u64 {
        u64::from(self.pool_start) + u64::from(self.pool_ranges) * u64::from(RANGE_SIZE)
    }
}

/// One line of a uid_map or gid_map: ids `container_id..+size` in the namespace are host ids
/// `host_id..+size` (CRI's IDMapping, OCI's LinuxIDMapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// The host ids a pod's ids 0..size are, uids and gids alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub host_id: u32,
    pub size: u32,
}

impl IdRange {
    /// The range as one uid_map/gid_map line.
    pub fn mapping(&self) -> IdMapping {
        IdMapping { container_id: 0, host_id: self.host_id, size: self.size }
    }

    fn end(&self) -> u64 {
        u64::from(self.host_id) + u64::from(self.size)
    }

    pub(crate) fn overlaps(&self, other: &IdRange) -> bool {
        u64::from(self.host_id) < other.end() && u64::from(other.host_id) < self.end()
    }
}

/// The pod range a process's `/proc/<pid>/uid_map` shows: its one line `0 <host> <size>`, unless
/// that is the node's identity map (a process outside any pod user namespace).
pub(crate) fn pod_range_of_uid_map(map: &str) -> Option<IdRange> {
    let mut lines = map.lines();
    let fields: Vec<u32> = lines.next()?.split_whitespace().map(|f| f.parse().ok()).collect::<Option<_>>()?;
    match (fields.as_slice(), lines.next()) {
        ([0, host_id, size], None) if *host_id != 0 => Some(IdRange { host_id: *host_id, size: *size }),
        _ => None,
    }
}

/// What RunPodSandbox asks for (`NamespaceOption.userns_options`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UsernsMode {
    /// No user namespace: the node's ids (mode NODE, or no userns_options at all).
    #[default]
    Node,
    /// A user namespace of the pod's own: with the kubelet's mappings, or (none given, as crictl
    /// and older kubelets do) a range from the daemon's pool.
    Pod { uid_mappings: Vec<IdMapping>, gid_mappings: Vec<IdMapping> },
}

impl UsernsMode {
    /// The range a kubelet's mappings give, after checking they are what the kubelet sends: one
    /// mapping, the same for uids and gids, container id 0, at least 65536 ids, not host id 0,
    /// not the images' foreign range. `None` when no mappings
    /// were given (the daemon then allocates one).
    pub fn requested_range(&self) -> Result<Option<IdRange>, Error> {
        let UsernsMode::Pod { uid_mappings, gid_mappings } = self else { return Ok(None) };
        let bad = |why: String| Err(Error::InvalidSpec(format!("user namespace mappings: {why}")));
        match (uid_mappings.as_slice(), gid_mappings.as_slice()) {
            ([], []) => Ok(None),
            ([uid], [gid]) => {
                if uid != gid {
                    return bad(format!("uid mapping {uid:?} and gid mapping {gid:?} differ; they must be identical"));
                }
                if uid.container_id != 0 {
                    return bad(format!("the mapping must start at container id 0, not {}", uid.container_id));
                }
                // The kubelet sends multiples of 65536 at aligned bases; other clients (critest:
                // 1000..+100000) need not, and containerd and CRI-O take them as given.
                if uid.size < RANGE_SIZE {
                    return bad(format!(
                        "length {} maps fewer than the 65536 ids image files may have (0..65535)",
                        uid.size
                    ));
                }
                if uid.host_id == 0 {
                    return bad("the mapping must not include the node's root (host id 0)".into());
                }
                let range = IdRange { host_id: uid.host_id, size: uid.size };
                if range.end() > u64::from(u32::MAX) {
                    return bad(format!("host ids {}..+{} go beyond 4294967294", uid.host_id, uid.size));
                }
                if range.overlaps(&IdRange { host_id: FOREIGN_BASE, size: RANGE_SIZE }) {
                    return bad(format!(
                        "host ids {}..+{} include the foreign range of container images ({FOREIGN_BASE})",
                        uid.host_id, uid.size
                    ));
                }
                Ok(Some(range))
            }
            (uids, gids) => {
                bad(format!("exactly one uid and one gid mapping are supported, got {} and {}", uids.len(), gids.len()))
            }
        }
    }
}

/// A pod's user namespace, as recorded with the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodUserns {
    pub range: IdRange,
    /// Allocated from the daemon's pool (else: the kubelet's choice).
    pub from_pool: bool,
}

/// The ranges in use, and the pool free ranges come from. A bitmap over the pool finds a free
/// range in O(pool / 64) word tests at worst, usually one; a map of every range in use (pool or
/// kubelet) checks overlaps in O(log n).
#[derive(Debug)]
pub(crate) struct IdRanges {
    config: UsernsConfig,
    /// One bit per pool range: set while any range in use covers it.
    pool_used: Vec<u64>,
    /// Every range in use by its first host id: (range, pod id).
    in_use: BTreeMap<u32, (IdRange, String)>,
    /// Where the next search starts: ranges are handed out round-robin, so that a range just
    /// released is not reused at once.
    next: u32,
    /// A range's first id that NSS did not know a moment ago (checked in the background after
    /// each allocation, so that the next pod does not wait for NSS; NSS may be slow).
    nss_clear: Option<(u32, std::time::Instant)>,
}

/// How long a background NSS check of the next range stands in for one at allocation.
const NSS_CHECK_VALID: std::time::Duration = std::time::Duration::from_secs(30);

impl IdRanges {
    pub(crate) fn new(config: UsernsConfig) -> IdRanges {
        let words = config.pool_ranges.div_ceil(64) as usize;
        IdRanges { config, pool_used: vec![0; words], in_use: BTreeMap::new(), next: 0, nss_clear: None }
    }

    /// The pod using a range that overlaps `range`, if any.
    pub(crate) fn user_of(&self, range: &IdRange) -> Option<&str> {
        // Ranges in use never overlap each other: only the last one starting below the end of
        // `range` can overlap it.
        let last_below_end = u32::try_from(range.end() - 1).unwrap_or(u32::MAX);
        self.in_use
            .range(..=last_below_end)
            .next_back()
            .filter(|(_, (used, _))| used.overlaps(range))
            .map(|(_, (_, pod))| pod.as_str())
    }

    /// Records `range` as `pod`'s (a kubelet's choice, or a pod record read at start). Fails,
    /// changing nothing, if another pod uses an overlapping range.
    pub(crate) fn reserve(&mut self, pod: &str, range: IdRange) -> Result<(), Error> {
        if let Some(other) = self.user_of(&range) {
            let what = if other == pod { "this pod already".to_string() } else { format!("pod {other}") };
            return Err(Error::IdRangeInUse(format!(
                "user namespace host ids {}..{} overlap the range {what} uses",
                range.host_id,
                range.end() - 1
            )));
        }
        self.in_use.insert(range.host_id, (range, pod.to_string()));
        self.mark(&range, true);
        Ok(())
    }

    /// The first id of the range `allocate` would try first, for a check ahead of time.
    pub(crate) fn next_candidate(&self) -> Option<u32> {
        let slots = self.config.pool_ranges;
        (0..slots)
            .map(|i| (self.next + i) % slots)
            .find(|slot| self.pool_used[(slot / 64) as usize] & (1 << (slot % 64)) == 0)
            .map(|slot| self.config.pool_start + slot * RANGE_SIZE)
    }

    /// Records that NSS knows nobody at `first_id` (see `nss_clear`).
    pub(crate) fn set_nss_clear(&mut self, first_id: u32) {
        self.nss_clear = Some((first_id, std::time::Instant::now()));
    }

    /// A free pool range for `pod`, skipping ranges whose first id `taken` reports in use by
    /// someone else (a user or group known to NSS, as systemd checks), unless a check moments ago
    /// found it clear. `None`: the pool is full.
    pub(crate) fn allocate(&mut self, pod: &str, mut taken: impl FnMut(u32) -> bool) -> Option<IdRange> {
        let checked = self.nss_clear.take().filter(|(_, at)| at.elapsed() < NSS_CHECK_VALID).map(|(id, _)| id);
        let mut taken = move |id: u32| checked != Some(id) && taken(id);
        let slots = self.config.pool_ranges;
        let mut slot = self.next % slots;
        let mut visited = 0;
        while visited < slots {
            let (word, bit) = ((slot / 64) as usize, slot % 64);
            if bit == 0 && self.pool_used[word] == u64::MAX && slots - slot >= 64 {
                // A full word: 64 ranges in use, skipped in one step.
                visited += 64;
                slot = (slot + 64) % slots;
                continue;
            }
            if self.pool_used[word] & (1 << bit) == 0 {
                let range = IdRange { host_id: self.config.pool_start + slot * RANGE_SIZE, size: RANGE_SIZE };
                if !taken(range.host_id) {
                    self.in_use.insert(range.host_id, (range, pod.to_string()));
                    self.mark(&range, true);
                    self.next = (slot + 1) % slots;
                    return Some(range);
                }
            }
            visited += 1;
            slot = (slot + 1) % slots;
        }
        None
    }

    /// Frees `pod`'s range (a range recorded for another pod is left alone).
    pub(crate) fn release(&mut self, pod: &str, range: &IdRange) {
        if self.in_use.get(&range.host_id).is_some_and(|(r, p)| r == range && p == pod) {
            self.in_use.remove(&range.host_id);
            self.mark(range, false);
            // A pool range partly covered by an unaligned neighbour stays in use.
            let neighbours: Vec<IdRange> = self
                .in_use
                .values()
                .map(|(r, _)| *r)
                .filter(|r| {
                    r.end() + u64::from(RANGE_SIZE) > u64::from(range.host_id)
                        && u64::from(r.host_id) < range.end() + u64::from(RANGE_SIZE)
                })
                .collect();
            for neighbour in neighbours {
                self.mark(&neighbour, true);
            }
        }
    }

    #[cfg(test)]
    fn pool_in_use(&self) -> u32 {
        self.pool_used.iter().map(|w| w.count_ones()).sum()
    }

    /// Sets or clears the bits of the pool ranges `range` covers.
    fn mark(&mut self, range: &IdRange, used: bool) {
        let start = u64::from(self.config.pool_start);
        let end = self.config.end();
        let (first, last) = (u64::from(range.host_id).max(start), range.end().min(end));
        if first >= last {
            return;
        }
        let size = u64::from(RANGE_SIZE);
        for slot in ((first - start) / size)..(last - start).div_ceil(size) {
            let (word, bit) = ((slot / 64) as usize, slot % 64);
            if used {
                self.pool_used[word] |= 1 << bit;
            } else {
                self.pool_used[word] &= !(1 << bit);
            }
        }
    }
}

/// Whether `id` is a user or a group the node's NSS knows (systemd's check before it hands out a
/// container range: someone else's range starts there).
pub fn known_to_nss(id: u32) -> bool {
    let mut buffer = vec![0u8; 16 * 1024];
    // SAFETY: passwd and group are plain C structs for which all-zero is a valid value.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the size passed; getpwuid_r writes only
    // there and is thread-safe.
    let rc = unsafe { libc::getpwuid_r(id, &mut passwd, buffer.as_mut_ptr().cast(), buffer.len(), &mut found) };
    if rc == 0 && !found.is_null() {
        return true;
    }
    // SAFETY: as above.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as above, for getgrgid_r.
    let rc = unsafe { libc::getgrgid_r(id, &mut group, buffer.as_mut_ptr().cast(), buffer.len(), &mut found) };
    rc == 0 && !found.is_null()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(start: u32, ranges: u32) -> IdRanges {
        IdRanges::new(UsernsConfig { pool_start: start, pool_ranges: ranges })
    }

    #[test]
    fn default_pool_is_systemds_container_range() {
        let config = UsernsConfig::default();
        assert_eq!(config.pool_start, 0x0008_0000);
        assert_eq!(config.end(), 0x7000_0000);
        config.validate(FOREIGN_BASE).unwrap();
        config.validate(0).unwrap();
    }

    #[test]
    fn bad_pools_name_their_key() {
        let check = |start, ranges, shift| UsernsConfig { pool_start: start, pool_ranges: ranges }.validate(shift);
        assert_eq!(check(0, 4, 0).unwrap_err().0, "userns.pool_start");
        assert_eq!(check(0x8_0001, 4, 0).unwrap_err().0, "userns.pool_start");
        assert_eq!(check(0x8_0000, 0, 0).unwrap_err().0, "userns.pool_ranges");
        assert_eq!(check(0xFFFF_0000, 1, 0).unwrap_err().0, "userns.pool_ranges");
        let foreign = check(0x7FF0_0000, 64, 0).unwrap_err();
        assert!(foreign.1.contains("foreign"), "{foreign:?}");
        let layers = check(0x10_0000, 4, 0x11_0000).unwrap_err();
        assert!(layers.1.contains("layer_uid_shift"), "{layers:?}");
        check(0x10_0000, 1, 0x11_0000).unwrap();
    }

    #[test]
    fn allocates_aligned_disjoint_ranges_until_the_pool_is_full() {
        let mut ranges = pool(0x8_0000, 3);
        let a = ranges.allocate("a", |_| false).unwrap();
        let b = ranges.allocate("b", |_| false).unwrap();
        let c = ranges.allocate("c", |_| false).unwrap();
        assert_eq!([a.host_id, b.host_id, c.host_id], [0x8_0000, 0x9_0000, 0xA_0000]);
        assert!([a, b, c].iter().all(|r| r.size == RANGE_SIZE));
        assert_eq!(ranges.allocate("d", |_| false), None);
        // Released ranges come back, and only the owner's release counts.
        ranges.release("x", &b);
        assert_eq!(ranges.allocate("d", |_| false), None);
        ranges.release("b", &b);
        assert_eq!(ranges.allocate("d", |_| false), Some(b));
        assert_eq!(ranges.pool_in_use(), 3);
    }

    #[test]
    fn a_range_checked_ahead_is_not_checked_again_but_only_once_and_only_that_one() {
        let mut ranges = pool(0x10_0000, 4);
        let first = ranges.next_candidate().unwrap();
        ranges.set_nss_clear(first);
        let mut asked = Vec::new();
        let range = ranges.allocate("a", |id| {
            asked.push(id);
            false
        });
        assert_eq!((range.unwrap().host_id, asked.len()), (first, 0));
        // The next allocation asks NSS again, for a range the check did not cover.
        let range = ranges.allocate("b", |id| {
            asked.push(id);
            false
        });
        assert_eq!(asked, [range.unwrap().host_id]);
        assert_ne!(range.unwrap().host_id, first);
    }

    #[test]
    fn skips_ranges_that_nss_knows_and_reuses_released_ones_last() {
        let mut ranges = pool(0x8_0000, 4);
        let first = ranges.allocate("a", |id| id == 0x8_0000).unwrap();
        assert_eq!(first.host_id, 0x9_0000);
        ranges.release("a", &first);
        // Round robin: the released range is not the next one handed out.
        assert_eq!(ranges.allocate("b", |_| false).unwrap().host_id, 0xA_0000);
        assert_eq!(ranges.allocate("c", |id| id != 0x9_0000).unwrap().host_id, 0x9_0000);
    }

    #[test]
    fn pod_range_of_uid_map_reads_one_shifted_line() {
        let range = IdRange { host_id: 0x8_0000, size: RANGE_SIZE };
        assert_eq!(pod_range_of_uid_map("         0     524288      65536\n"), Some(range));
        assert_eq!(pod_range_of_uid_map("         0          0 4294967295\n"), None);
        assert_eq!(pod_range_of_uid_map("0 1 1\n1 2 3\n"), None);
        assert_eq!(pod_range_of_uid_map(""), None);
    }

    #[test]
    fn releasing_an_unaligned_range_keeps_the_pool_range_its_neighbour_shares() {
        let mut ranges = pool(0x8_0000, 4);
        // Two unaligned kubelet ranges sharing the pool's second 64K range.
        ranges.reserve("a", IdRange { host_id: 0x8_8000, size: RANGE_SIZE }).unwrap();
        ranges.reserve("b", IdRange { host_id: 0x9_8000, size: RANGE_SIZE }).unwrap();
        assert_eq!(ranges.pool_in_use(), 3);
        ranges.release("a", &IdRange { host_id: 0x8_8000, size: RANGE_SIZE });
        assert_eq!(ranges.pool_in_use(), 2, "b still covers part of 0x90000..0x9FFFF");
        assert_eq!(ranges.allocate("c", |_| false).unwrap().host_id, 0x8_0000);
        assert_eq!(ranges.allocate("d", |_| false).unwrap().host_id, 0xB_0000);
        assert_eq!(ranges.allocate("e", |_| false), None);
    }

    #[test]
    fn reserved_ranges_are_never_handed_out_and_overlaps_are_refused() {
        let mut ranges = pool(0x8_0000, 200);
        // A kubelet range of 2x64K inside the pool, and one outside it.
        ranges.reserve("k", IdRange { host_id: 0x8_0000, size: 2 * RANGE_SIZE }).unwrap();
        ranges.reserve("outside", IdRange { host_id: 0x1_0000, size: RANGE_SIZE }).unwrap();
        let err = ranges.reserve("k2", IdRange { host_id: 0x9_0000, size: RANGE_SIZE }).unwrap_err();
        assert!(matches!(&err, Error::IdRangeInUse(m) if m.contains("pod k")), "{err}");
        assert_eq!(ranges.user_of(&IdRange { host_id: 0, size: 0x2_0000 }), Some("outside"));
        assert_eq!(ranges.user_of(&IdRange { host_id: 0x2_0000, size: RANGE_SIZE }), None);
        assert_eq!(ranges.allocate("a", |_| false).unwrap().host_id, 0xA_0000);
        // Word skipping: fill 130 ranges, the search still finds the free ones after them.
        for i in 0..130 {
            ranges.allocate(&format!("p{i}"), |_| false).unwrap();
        }
        assert_eq!(ranges.pool_in_use(), 133);
        let mut left = 0;
        while ranges.allocate("rest", |_| false).is_some() {
            left += 1;
        }
        assert_eq!(left, 200 - 133);
    }

    #[test]
    fn kubelet_mappings_are_checked() {
        let pod = |uid: IdMapping, gid: IdMapping| UsernsMode::Pod { uid_mappings: vec![uid], gid_mappings: vec![gid] };
        let good = IdMapping { container_id: 0, host_id: 0x1_0000 * 10, size: RANGE_SIZE };
        assert_eq!(pod(good, good).requested_range().unwrap(), Some(IdRange { host_id: 0xA_0000, size: RANGE_SIZE }));
        assert_eq!(UsernsMode::Pod { uid_mappings: vec![], gid_mappings: vec![] }.requested_range().unwrap(), None);
        assert_eq!(UsernsMode::Node.requested_range().unwrap(), None);
        let bad = [
            pod(good, IdMapping { host_id: 0xB_0000, ..good }),
            pod(IdMapping { container_id: 1, ..good }, IdMapping { container_id: 1, ..good }),
            pod(IdMapping { size: 1000, ..good }, IdMapping { size: 1000, ..good }),
            pod(IdMapping { host_id: 0, ..good }, IdMapping { host_id: 0, ..good }),
            pod(IdMapping { host_id: FOREIGN_BASE, ..good }, IdMapping { host_id: FOREIGN_BASE, ..good }),
            pod(IdMapping { host_id: 0xFFFF_0000, ..good }, IdMapping { host_id: 0xFFFF_0000, ..good }),
            UsernsMode::Pod { uid_mappings: vec![good, good], gid_mappings: vec![good, good] },
            UsernsMode::Pod { uid_mappings: vec![good], gid_mappings: vec![] },
        ];
        // What critest's NamespaceMode_POD spec sends: unaligned, not a multiple of 65536.
        let critest = IdMapping { container_id: 0, host_id: 1000, size: 100_000 };
        assert_eq!(pod(critest, critest).requested_range().unwrap(), Some(IdRange { host_id: 1000, size: 100_000 }));
        let unaligned = IdMapping { host_id: 0xA_8000, ..good };
        assert_eq!(
            pod(unaligned, unaligned).requested_range().unwrap(),
            Some(IdRange { host_id: 0xA_8000, size: RANGE_SIZE })
        );
        for mode in bad {
            let err = mode.requested_range().unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{mode:?}: {err}");
        }
    }

    #[test]
    fn root_is_known_to_nss() {
        assert!(known_to_nss(0));
        assert!(!known_to_nss(0x6FFF_0000));
    }
}
