//! What ibstream remembers between runs, as records of the compacted state topic.
//!
//! Keys (UTF-8):
//! - `cursor/<scope>`: a [`Cursor`] as JSON `{"v":1,"watermark":"YYYY-MM-DD"|null,"next":…,
//!   "open":[{"day":"YYYY-MM-DD","since":RFC 3339,"missing":N}],"swept":RFC 3339}` (`open` and
//!   `swept` are left out when empty; a release that predates them ignores them). Scopes: `leads/registration`, `leads/lastModified`, `customers/registration`,
//!   `customers/lastModified`, `transactions`, `positions/<serverTag>`.
//! - `fps/<n>/<scope>`: a *segment* of fingerprints of one scope (`leads`, …,
//!   `positions/<serverTag>`): the entities one batch emitted, up to 5,000, each the
//!   fingerprint of its last emitted version and its day (days since 1970-01-01, for pruning
//!   append-only streams). Value: version `2`, then per entity `0` + id (u64 LE) or `1` + name
//!   length (u16 LE) + name (ids kept as a hash in memory), fingerprint (u64 LE), day
//!   (i32 LE). An entity's entry is the one in its newest segment; a segment none of whose
//!   entries is the latest any more is tombstoned. See [`FpMap`]. Segment numbers are
//!   never reused over the topic's life (an emptied scope included).
//! - `segments/<scope>`: the numbering bound of a scope's segments, JSON `{"v":1,"next":N}`:
//!   every segment number the scope used is below `N`; written ahead of the segments it
//!   covers, never tombstoned. See [`SegmentCounter`].
//! - `fp/<stream>/<id>` (written by releases before segments, still read): the fingerprint of
//!   one entity, 13 bytes: version `1`, fingerprint (u64 LE), day (i32 LE). A tombstone
//!   forgets it unless a segment holds it; such entries move into segments when they change
//!   or, a batch at a time, at cursor saves.
//! - `barrier/<instance_id>`: the start-up barrier (a nonce), see `kafka::restore`
//!   (`barrier/<instance_id>/tools`: the barrier of `ibstream state`).
//! - `alive/<instance_id>`: a running instance's heartbeat, JSON `{"v":1,"at":RFC 3339}`,
//!   written every 30 s; `ibstream state reset` refuses while it is fresh.
//! - `started/<instance_id>`: a run was allowed to start on this state topic, JSON
//!   `{"v":1,"at":RFC 3339,"rebuild":bool,"streams":["leads",…]}` (`streams`: the streams
//!   the instance was started with, at this start and before; a marker without it covers
//!   every stream); written before the run emits anything, never tombstoned. See [`Started`].
//!
//! ## What is durable when
//!
//! A page's events and the fingerprints of what they emitted are one batch (one Kafka
//! transaction in exactly-once; the state records after the events' acknowledgements in
//! at-least-once). A cursor moves in a batch of its own, after every window before it was
//! read to its end. A backfill or a sweep reads several windows at once
//! (`crm.max_concurrent_requests`) and commits their pages as they come, in any order; the
//! cursor (`watermark`, `next`, the open days) still moves only over the contiguous prefix of
//! windows read to their end. So after a crash the state holds: the cursor at the first
//! window not read to its end, and the fingerprints of every page committed, beyond the cursor
//! too. The windows from the cursor on are read again, and what was committed of them is
//! recognised by its fingerprint (nothing emitted again, nothing under a new `eventId`); what
//! was not is emitted then. A window read to its end beyond an unfinished one, and the days
//! it found short, exist only in memory until the cursor reaches it.
//!
//! ## A lost state
//!
//! `run` refuses to start when, for an enabled stream whose data topic already holds
//! records, the state topic holds no progress of that stream ([`State::holds_progress_of`]:
//! no cursor or fingerprint of its scopes, no `started/<instance_id>` marker of this
//! instance listing it): the state was lost, and starting would emit everything again. It
//! is decided per stream because instances that split the streams may share a state topic:
//! another instance's progress on its streams never lets this one start on a lost state of
//! its own (a marker of an earlier release, without a list of streams, covers every stream
//! of its instance). The dead-letter topic, shared by every stream, is covered by any
//! progress ([`State::holds_progress`]). The rule reads content, never record counts: barriers (of refused starts and of `ibstream state`),
//! heartbeats and the `check/` records of earlier releases are no progress, so a refused
//! start refuses again on every restart (an orchestrator restarting the pod included) until
//! `run --rebuild-state` writes its marker. A first start (empty data topics) writes the
//! marker before its first event, so a crash before its first cursor save is not taken for
//! a lost state at the next start; after `--rebuild-state`, restarts without the flag go on
//! with the rebuild (its marker, then its cursors and fingerprints).
//!
//! Values carry a format version so later releases can read what earlier ones wrote; an
//! unknown version is an error at start-up, never silently ignored.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// Format version of state values.
pub const STATE_VERSION: u8 = 1;

/// Progress of one cursor scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The last day read completely after it had ended (plus the closing lag).
    pub watermark: Option<NaiveDate>,
    /// Where an unfinished cycle resumes (backfill progress); `None` between cycles.
    pub next: Option<NaiveDate>,
    /// Days read with fewer distinct records than their `total`, even after re-reads: retried
    /// every cycle until complete or given up (`streams.open_window_retention_days`).
    pub open: Vec<OpenWindow>,
    /// When the last reconciliation sweep of this scope finished (the backfill counts as one).
    pub swept: Option<DateTime<Utc>>,
}

/// A day whose records were not all read, kept beside the cursor until they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenWindow {
    /// The day.
    pub day: NaiveDate,
    /// When it was first found short.
    pub since: DateTime<Utc>,
    /// Records missing at the last read (`total` minus distinct ids seen).
    pub missing: u64,
}

#[derive(Serialize, Deserialize)]
struct CursorValue {
    v: u8,
    watermark: Option<NaiveDate>,
    next: Option<NaiveDate>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    open: Vec<OpenWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    swept: Option<DateTime<Utc>>,
}

impl Cursor {
    /// Returns the state key of a cursor scope.
    pub fn key(scope: &str) -> String {
        format!("cursor/{scope}")
    }

    /// Encodes the cursor as a state value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&CursorValue {
            v: STATE_VERSION,
            watermark: self.watermark,
            next: self.next,
            open: self.open.clone(),
            swept: self.swept,
        })
        .unwrap_or_default()
    }

    /// Decodes a state value.
    pub fn decode(bytes: &[u8]) -> Result<Cursor, String> {
        let value: CursorValue =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable cursor: {e}"))?;
        if value.v != STATE_VERSION {
            return Err(format!(
                "cursor format version {} is not supported (this build reads {STATE_VERSION})",
                value.v
            ));
        }
        Ok(Cursor {
            watermark: value.watermark,
            next: value.next,
            open: value.open,
            swept: value.swept,
        })
    }

    /// Records a day found short (keeps the first `since` of a day already open).
    pub fn open_day(&mut self, day: NaiveDate, missing: u64, now: DateTime<Utc>) {
        match self.open.iter_mut().find(|w| w.day == day) {
            Some(window) => window.missing = missing,
            None => {
                self.open.push(OpenWindow {
                    day,
                    since: now,
                    missing,
                });
                self.open.sort_by_key(|w| w.day);
            }
        }
    }
}

/// What is remembered of one entity. Packed to 4-byte alignment: with its 8-byte key an
/// entry takes 20 bytes in the map instead of 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct FpEntry {
    /// Fingerprint of the last emitted version.
    pub fp: u64,
    /// The record's day (append-only streams prune by it), days since 1970-01-01.
    pub day: i32,
}

impl FpEntry {
    /// Encodes the entry as a state value.
    pub fn encode(&self) -> Vec<u8> {
        let (fp, day) = (self.fp, self.day);
        let mut out = Vec::with_capacity(13);
        out.push(STATE_VERSION);
        out.extend_from_slice(&fp.to_le_bytes());
        out.extend_from_slice(&day.to_le_bytes());
        out
    }

    /// Decodes a state value.
    pub fn decode(bytes: &[u8]) -> Result<FpEntry, String> {
        match bytes {
            [STATE_VERSION, rest @ ..] if rest.len() == 12 => {
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&rest[..8]);
                let mut day = [0u8; 4];
                day.copy_from_slice(&rest[8..]);
                Ok(FpEntry {
                    fp: u64::from_le_bytes(fp),
                    day: i32::from_le_bytes(day),
                })
            }
            [version, ..] => Err(format!(
                "fingerprint format version {version} is not supported"
            )),
            [] => Err("empty fingerprint value".to_owned()),
        }
    }

    /// Returns the state key of an entity's fingerprint.
    pub fn key(stream: &str, id: &str) -> String {
        format!("fp/{stream}/{id}")
    }
}

/// Hasher for keys that are already well-mixed 64-bit values.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Numeric ids are dense; spread them so hashbrown's top bits vary.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The compact key of an entity in a fingerprint map.
///
/// Ids that are plain non-negative integers (every id the CRM serves except server tags) are
/// kept exactly, so the entity's state key can be rebuilt to prune it; other ids are a
/// 63-bit xxh3 hash with the top bit set (two such ids colliding has probability ~n²/2⁶⁴).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C, packed(4))]
pub struct EntityKey(u64);

const HASHED: u64 = 1 << 63;

impl EntityKey {
    /// Returns the key of an id.
    pub fn of(id: &str) -> EntityKey {
        match id.parse::<u64>() {
            Ok(n) if n < HASHED && (id == "0" || !id.starts_with('0')) => EntityKey(n),
            _ => EntityKey(HASHED | (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) >> 1)),
        }
    }

    /// Returns the key's 64 bits.
    fn raw(self) -> u64 {
        self.0
    }

    /// Returns the id again, when the key holds it exactly.
    pub fn id(self) -> Option<String> {
        let raw = self.0;
        (raw & HASHED == 0).then(|| raw.to_string())
    }
}

/// Segment number of an entity whose fingerprint is in a per-entity `fp/` record of an
/// earlier release (migrated into a segment when it changes, dropped with a tombstone).
pub const LEGACY: u32 = u32::MAX;

/// Most entries in one segment record (21 bytes each: ~100 KB, well under Kafka's 1 MB).
pub const SEGMENT_MAX: usize = 5_000;

/// Format version of segment values.
const SEGMENT_VERSION: u8 = 2;

/// Segment numbers a bound record reserves ahead, so it is written once per this many
/// segments of a scope, not with every batch.
pub const SEGMENT_RESERVE: u32 = 256;

/// The numbering bound of a scope's segments, record `segments/<scope>`: every segment
/// number the scope ever used is below `next`.
///
/// Segment numbers are unique over the state topic's whole life: a number is never written
/// twice, so no old value or tombstone of `fps/<n>/<scope>` still in the log can be taken for
/// a newer segment's (a restore would bring back entities forgotten long ago, and count the
/// newer segment's live entries short, then tombstone it while it still holds some). The
/// next number is the highest of: one above every segment seen (values and tombstones) and
/// this bound. The bound is written ahead of the segments it covers (first in their batch;
/// one transaction, or one idempotent producer and partition, so never visible after them),
/// is never tombstoned (`state reset --resnapshot` keeps it) and compaction keeps its latest
/// value: it only grows, even after the scope emptied or compaction removed every record of
/// its older segments. A state topic of a release before the bound has none until its first
/// segment write: numbers seen in the log are not reused, and only a number whose every
/// record compaction removed could be, which nothing can mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentCounter {
    /// Above every segment number used.
    pub next: u32,
}

#[derive(Serialize, Deserialize)]
struct SegmentCounterValue {
    v: u8,
    next: u32,
}

impl SegmentCounter {
    /// Returns the state key of a scope's bound.
    pub fn key(scope: &str) -> String {
        format!("segments/{scope}")
    }

    /// Encodes the bound as a state value, JSON `{"v":1,"next":N}`.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&SegmentCounterValue {
            v: STATE_VERSION,
            next: self.next,
        })
        .unwrap_or_default()
    }

    /// Decodes a state value.
    pub fn decode(bytes: &[u8]) -> Result<SegmentCounter, String> {
        let value: SegmentCounterValue =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable segment bound: {e}"))?;
        if value.v != STATE_VERSION {
            return Err(format!(
                "segment bound format version {} is not supported (this build reads {STATE_VERSION})",
                value.v
            ));
        }
        Ok(SegmentCounter { next: value.next })
    }
}

/// What the map keeps per entity: the entry and the segment record that holds it.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct Slot {
    fp: u64,
    day: i32,
    segment: u32,
}

/// Entries written into a segment record, and how many of them are still the entity's
/// latest (when none is, the record is tombstoned).
#[derive(Debug, Clone, Copy, Default)]
struct SegmentCount {
    written: u32,
    live: u32,
}

/// Fingerprints of one stream (or one server tag of positions): ~35 bytes per entity.
///
/// Persisted as *segments*: the fingerprints a batch changes go into one record
/// `fps/<n>/<scope>` (see [`segment_key`]), so a page of 1,000 events costs one state record
/// instead of 1,000. Compaction keeps the latest value of each segment key; an entity's
/// latest entry is the one in the newest segment holding it (a restore replays in offset
/// order), and a segment whose entries were all superseded or pruned is tombstoned. A pruned
/// entity in a segment that still holds live entries comes back at the next restore and is
/// pruned again at the next cursor save: harmless, it is only remembered longer.
///
/// Ids the [`EntityKey`] keeps only as a hash (dead-letter markers, server tags, non-numeric
/// ids of other CRMs) are also kept by name, so their records can be rebuilt.
#[derive(Debug, Default, Clone)]
pub struct FpMap {
    map: HashMap<EntityKey, Slot, BuildHasherDefault<IdHasher>>,
    names: HashMap<EntityKey, Box<str>, BuildHasherDefault<IdHasher>>,
    segments: HashMap<u32, SegmentCount, BuildHasherDefault<IdHasher>>,
    /// The next segment number (above every number seen, tombstoned ones included, and at
    /// least `reserved`).
    next_segment: u32,
    /// The persisted bound (`segments/<scope>`): every number this scope ever used is below
    /// it. See [`SegmentCounter`].
    reserved: u32,
    /// Segments tombstoned during a restore (entities still pointing to them were pruned).
    dead: std::collections::HashSet<u32>,
    /// Entities still in per-entity records.
    legacy: usize,
}

/// What [`FpMap::plan_write`] or [`FpMap::plan_remove`] prepared, applied once the batch
/// holding its records is committed.
#[derive(Debug, Default)]
pub struct FpPlan {
    writes: Vec<(EntityKey, FpEntry, u32, Option<Box<str>>)>,
    removes: Vec<EntityKey>,
    segments: Vec<(u32, u32)>,
    reserved: Option<u32>,
}

/// Returns the per-entity key (`fp/<stream>/<id>`) an earlier release wrote for the id `id`
/// of a scope (`positions/<tag>` ids are qualified as `<tag>:<id>`).
pub fn legacy_key(scope: &str, id: &str) -> String {
    match scope.split_once('/') {
        Some((stream, tag)) => FpEntry::key(stream, &format!("{tag}:{id}")),
        None => FpEntry::key(scope, id),
    }
}

/// A state record to write: key and value (`None`: a tombstone).
pub type StateRecord = (String, Option<Vec<u8>>);

/// Returns the state key of segment `n` of a scope (`leads`, `positions/<tag>`, …).
pub fn segment_key(scope: &str, n: u32) -> String {
    format!("fps/{n}/{scope}")
}

impl FpMap {
    /// Returns the entry of an entity.
    pub fn get(&self, key: EntityKey) -> Option<FpEntry> {
        self.map.get(&key).map(|slot| FpEntry {
            fp: slot.fp,
            day: slot.day,
        })
    }

    /// Remembers an entity's entry, held by `segment` ([`LEGACY`]: a per-entity record);
    /// `name` is the id of a hashed key.
    fn put(&mut self, key: EntityKey, entry: FpEntry, segment: u32, name: Option<&str>) {
        if let (None, Some(name)) = (key.id(), name) {
            self.names.insert(key, name.into());
        }
        let slot = Slot {
            fp: entry.fp,
            day: entry.day,
            segment,
        };
        if let Some(old) = self.map.insert(key, slot) {
            self.release(old.segment);
        }
        if segment == LEGACY {
            self.legacy += 1;
        } else if let Some(count) = self.segments.get_mut(&segment) {
            count.live += 1;
        }
    }

    fn release(&mut self, segment: u32) {
        if segment == LEGACY {
            self.legacy = self.legacy.saturating_sub(1);
        } else if let Some(count) = self.segments.get_mut(&segment) {
            count.live = count.live.saturating_sub(1);
        }
    }

    /// Remembers an entity's entry as if read from a per-entity record (tests, tools).
    pub fn insert(&mut self, key: EntityKey, entry: FpEntry, id: &str) {
        self.put(key, entry, LEGACY, Some(id));
    }

    /// Forgets an entity.
    pub fn remove(&mut self, key: EntityKey) {
        if let Some(old) = self.map.remove(&key) {
            self.release(old.segment);
            if self.segments.get(&old.segment).is_some_and(|c| c.live == 0) {
                self.segments.remove(&old.segment);
            }
        }
        self.names.remove(&key);
    }

    /// Returns the number of entities.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Returns whether no entity is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Returns the number of segment records holding live entries.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    fn id_of(&self, key: EntityKey) -> Option<String> {
        key.id()
            .or_else(|| self.names.get(&key).map(|n| n.to_string()))
    }

    /// Returns the entities whose day is before `day` (to prune), with their ids in the scope.
    pub fn stale_before(&self, day: i32) -> Vec<(EntityKey, String)> {
        self.map
            .iter()
            .filter(|(_, slot)| {
                let entry_day = slot.day;
                entry_day < day
            })
            .filter_map(|(k, _)| self.id_of(*k).map(|id| (*k, id)))
            .collect()
    }

    /// Prepares the state records that persist `changes` (the last of an entity counts):
    /// segment records of up to [`SEGMENT_MAX`] entries, then tombstones of the segments
    /// they leave without a live entry and of the per-entity records they replace
    /// ([`legacy_key`] names those). Nothing changes in memory until [`FpMap::apply`].
    pub fn plan_write(
        &mut self,
        scope: &str,
        changes: &[(EntityKey, FpEntry, Option<Box<str>>)],
    ) -> (Vec<StateRecord>, FpPlan) {
        let mut last: HashMap<EntityKey, usize, BuildHasherDefault<IdHasher>> = HashMap::default();
        for (i, (key, ..)) in changes.iter().enumerate() {
            last.insert(*key, i);
        }
        let mut order: Vec<usize> = last.values().copied().collect();
        order.sort_unstable();
        let mut records = Vec::new();
        let mut plan = FpPlan::default();
        // The bound goes first: a segment number is never visible without a bound above it.
        let needed = self
            .next_segment
            .saturating_add(order.len().div_ceil(SEGMENT_MAX) as u32);
        if needed > self.reserved {
            let bound = needed.saturating_add(SEGMENT_RESERVE);
            records.push((
                SegmentCounter::key(scope),
                Some(SegmentCounter { next: bound }.encode()),
            ));
            plan.reserved = Some(bound);
        }
        for chunk in order.chunks(SEGMENT_MAX) {
            let segment = self.next_segment;
            self.next_segment += 1;
            let mut value = Vec::with_capacity(1 + chunk.len() * 21);
            value.push(SEGMENT_VERSION);
            for &i in chunk {
                let (key, entry, name) = &changes[i];
                let name = name.clone().or_else(|| self.names.get(key).cloned());
                encode_segment_entry(&mut value, *key, name.as_deref(), *entry);
                plan.writes.push((*key, *entry, segment, name));
            }
            records.push((segment_key(scope, segment), Some(value)));
            plan.segments.push((segment, chunk.len() as u32));
        }
        let keys: Vec<EntityKey> = order.iter().map(|&i| changes[i].0).collect();
        records.extend(self.emptied(scope, &keys));
        (records, plan)
    }

    /// Prepares the tombstones that forget `keys`: of their emptied segments and of their
    /// per-entity records.
    pub fn plan_remove(&self, scope: &str, keys: &[EntityKey]) -> (Vec<StateRecord>, FpPlan) {
        let records = self.emptied(scope, keys);
        let plan = FpPlan {
            removes: keys.to_vec(),
            ..FpPlan::default()
        };
        (records, plan)
    }

    /// Tombstones of the segments that `keys` (distinct) leave empty when they move or go,
    /// and of their per-entity records.
    fn emptied(&self, scope: &str, keys: &[EntityKey]) -> Vec<StateRecord> {
        let mut leaving: HashMap<u32, u32, BuildHasherDefault<IdHasher>> = HashMap::default();
        let mut records = Vec::new();
        for key in keys {
            let Some(slot) = self.map.get(key) else {
                continue;
            };
            if slot.segment == LEGACY {
                if let Some(id) = self.id_of(*key) {
                    records.push((legacy_key(scope, &id), None));
                }
            } else {
                *leaving.entry(slot.segment).or_default() += 1;
            }
        }
        let mut emptied: Vec<u32> = leaving
            .into_iter()
            .filter(|(segment, n)| self.segments.get(segment).is_none_or(|c| c.live <= *n))
            .map(|(segment, _)| segment)
            .collect();
        emptied.sort_unstable();
        records.extend(emptied.into_iter().map(|s| (segment_key(scope, s), None)));
        records
    }

    /// Applies a plan whose records were committed.
    pub fn apply(&mut self, plan: FpPlan) {
        if let Some(bound) = plan.reserved {
            self.reserved = self.reserved.max(bound);
        }
        for (segment, written) in plan.segments {
            self.segments
                .insert(segment, SegmentCount { written, live: 0 });
        }
        for (key, entry, segment, name) in plan.writes {
            self.put(key, entry, segment, name.as_deref());
        }
        for key in plan.removes {
            self.remove(key);
        }
        self.segments.retain(|_, count| count.live > 0);
    }

    /// Prepares a rewrite of scattered entries, when there is one to do: the live entries
    /// of segments less than a quarter live (once the segments hold more than twice the
    /// live entries) and entries still in per-entity records of an earlier release, at most
    /// `limit` per call. The rewritten segments and records are tombstoned, so the state
    /// topic stays proportional to the entities remembered.
    pub fn plan_compaction(
        &mut self,
        scope: &str,
        limit: usize,
    ) -> Option<(Vec<StateRecord>, FpPlan)> {
        let stored: usize = self.segments.values().map(|c| c.written as usize).sum();
        let scattered = stored > 2 * self.map.len() + SEGMENT_MAX;
        if !scattered && self.legacy == 0 {
            return None;
        }
        let sparse: std::collections::HashSet<u32> = self
            .segments
            .iter()
            .filter(|(_, c)| scattered && (c.live as usize) * 4 < c.written as usize)
            .map(|(segment, _)| *segment)
            .collect();
        let changes: Vec<(EntityKey, FpEntry, Option<Box<str>>)> = self
            .map
            .iter()
            .filter(|(_, slot)| {
                let segment = slot.segment;
                segment == LEGACY || sparse.contains(&segment)
            })
            .take(limit)
            .map(|(key, slot)| {
                let entry = FpEntry {
                    fp: slot.fp,
                    day: slot.day,
                };
                (*key, entry, self.names.get(key).cloned())
            })
            .collect();
        (!changes.is_empty()).then(|| self.plan_write(scope, &changes))
    }

    /// Every state key holding this scope's fingerprints (to drop them all).
    pub fn state_keys(&self, scope: &str) -> Vec<String> {
        let mut segments: Vec<u32> = self.segments.keys().copied().collect();
        segments.sort_unstable();
        let mut keys: Vec<String> = segments.iter().map(|s| segment_key(scope, *s)).collect();
        for (key, slot) in &self.map {
            if slot.segment == LEGACY {
                if let Some(id) = self.id_of(*key) {
                    keys.push(legacy_key(scope, &id));
                }
            }
        }
        keys
    }

    /// Restore: the scope's numbering bound (`segments/<scope>`).
    fn restore_counter(&mut self, counter: SegmentCounter) {
        self.reserved = self.reserved.max(counter.next);
        self.next_segment = self.next_segment.max(counter.next);
    }

    /// Returns whether the map holds nothing to remember, numbering included (a scope that
    /// emptied keeps its map: its next segment number must stay above every one it used).
    fn is_blank(&self) -> bool {
        self.map.is_empty() && self.next_segment == 0
    }

    /// Restore: a segment record (`None`: its tombstone).
    fn restore_segment(&mut self, segment: u32, value: Option<&[u8]>) -> Result<(), String> {
        self.next_segment = self.next_segment.max(segment.saturating_add(1));
        let Some(bytes) = value else {
            self.dead.insert(segment);
            return Ok(());
        };
        self.dead.remove(&segment);
        let entries = decode_segment(bytes)?;
        self.segments.insert(
            segment,
            SegmentCount {
                written: entries.len() as u32,
                live: 0,
            },
        );
        for (key, name, entry) in entries {
            self.put(key, entry, segment, name.as_deref());
        }
        Ok(())
    }

    /// Restore done: forgets the entities whose latest segment was tombstoned (pruned), and
    /// the segments without a live entry.
    fn finish_restore(&mut self) {
        if !self.dead.is_empty() {
            let dead = std::mem::take(&mut self.dead);
            let gone: Vec<EntityKey> = self
                .map
                .iter()
                .filter(|(_, slot)| {
                    let segment = slot.segment;
                    dead.contains(&segment)
                })
                .map(|(k, _)| *k)
                .collect();
            for key in gone {
                self.remove(key);
            }
            for segment in dead {
                self.segments.remove(&segment);
            }
        }
        self.segments.retain(|_, count| count.live > 0);
    }
}

fn encode_segment_entry(out: &mut Vec<u8>, key: EntityKey, name: Option<&str>, entry: FpEntry) {
    let (fp, day) = (entry.fp, entry.day);
    match key.id() {
        Some(_) => {
            out.push(0);
            out.extend_from_slice(&key.raw().to_le_bytes());
        }
        None => {
            let name = name.unwrap_or("").as_bytes();
            let len = name.len().min(u16::MAX as usize);
            out.push(1);
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&name[..len]);
        }
    }
    out.extend_from_slice(&fp.to_le_bytes());
    out.extend_from_slice(&day.to_le_bytes());
}

/// Decodes a segment value: version 2, then per entry `0, id (u64 LE)` or `1, name length
/// (u16 LE), name`, then fingerprint (u64 LE) and day (i32 LE).
fn decode_segment(bytes: &[u8]) -> Result<Vec<(EntityKey, Option<String>, FpEntry)>, String> {
    let (version, mut rest) = bytes
        .split_first()
        .ok_or_else(|| "empty fingerprint segment".to_owned())?;
    if *version != SEGMENT_VERSION {
        return Err(format!(
            "fingerprint segment format version {version} is not supported"
        ));
    }
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("truncated fingerprint segment".to_owned());
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let mut entries = Vec::with_capacity(bytes.len() / 21);
    while let Ok(kind) = take(1) {
        let kind = kind[0];
        let (key, name) = match kind {
            0 => {
                let raw = u64::from_le_bytes(take(8)?.try_into().unwrap_or_default());
                if raw & HASHED != 0 {
                    return Err("fingerprint segment: a numeric id out of range".to_owned());
                }
                (EntityKey(raw), None)
            }
            1 => {
                let len = u16::from_le_bytes(take(2)?.try_into().unwrap_or_default()) as usize;
                let name = std::str::from_utf8(take(len)?)
                    .map_err(|_| "fingerprint segment: a name is not UTF-8".to_owned())?
                    .to_owned();
                (EntityKey::of(&name), Some(name))
            }
            other => return Err(format!("fingerprint segment: unknown entry kind {other}")),
        };
        let fp = u64::from_le_bytes(take(8)?.try_into().unwrap_or_default());
        let day = i32::from_le_bytes(take(4)?.try_into().unwrap_or_default());
        entries.push((key, name, FpEntry { fp, day }));
    }
    Ok(entries)
}

/// A running instance's sign of life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// When it was written.
    pub at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct HeartbeatValue {
    v: u8,
    at: DateTime<Utc>,
}

impl Heartbeat {
    /// Returns the state key of an instance's heartbeat.
    pub fn key(instance_id: &str) -> String {
        format!("alive/{instance_id}")
    }

    /// Encodes the heartbeat as a state value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&HeartbeatValue {
            v: STATE_VERSION,
            at: self.at,
        })
        .unwrap_or_default()
    }

    /// Decodes a state value.
    pub fn decode(bytes: &[u8]) -> Result<Heartbeat, String> {
        let value: HeartbeatValue =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable heartbeat: {e}"))?;
        Ok(Heartbeat { at: value.at })
    }
}

/// The marker of a run that was allowed to start (`started/<instance_id>`): the state topic
/// has been written by a run of that instance for the streams it lists, so an empty-looking
/// state is not a lost one for them. Written before the run emits any event; rewritten at
/// every start (compaction keeps the latest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// When the run started.
    pub at: DateTime<Utc>,
    /// Whether it was a `run --rebuild-state`.
    pub rebuild: bool,
    /// The streams the instance was started with (at this start and the starts before it);
    /// `None` in a marker of a release that did not list them, taken as covering every
    /// stream.
    pub streams: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
struct StartedValue {
    v: u8,
    at: DateTime<Utc>,
    #[serde(default)]
    rebuild: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    streams: Option<Vec<String>>,
}

impl Started {
    /// Returns the state key of an instance's start marker.
    pub fn key(instance_id: &str) -> String {
        format!("started/{instance_id}")
    }

    /// Encodes the marker as a state value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&StartedValue {
            v: STATE_VERSION,
            at: self.at,
            rebuild: self.rebuild,
            streams: self.streams.clone(),
        })
        .unwrap_or_default()
    }

    /// Decodes a state value.
    pub fn decode(bytes: &[u8]) -> Result<Started, String> {
        let value: StartedValue =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable start marker: {e}"))?;
        Ok(Started {
            at: value.at,
            rebuild: value.rebuild,
            streams: value.streams,
        })
    }

    /// Returns whether the marker covers `stream` (a marker without a list covers every one).
    pub fn covers(&self, stream: &str) -> bool {
        self.streams
            .as_ref()
            .is_none_or(|streams| streams.iter().any(|s| s == stream))
    }
}

/// Everything restored from the state topic, by scope.
#[derive(Debug, Default)]
pub struct State {
    /// Cursors by scope.
    pub cursors: HashMap<String, Cursor>,
    /// Heartbeats by instance id.
    pub heartbeats: HashMap<String, Heartbeat>,
    /// Fingerprints by scope (`leads`, …, `positions/<tag>`).
    pub fingerprints: HashMap<String, FpMap>,
    /// Start markers by instance id (see [`Started`]).
    pub started: HashMap<String, Started>,
    /// Records the state topic held before this process's start-up barrier (0: an empty or
    /// new state topic). Not a sign of progress: see [`State::holds_progress`].
    pub records_before: u64,
    scratch: String,
}

impl State {
    /// Applies one state record (`None` value: a tombstone). Unknown key families are
    /// ignored (barriers, or keys of a later release).
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if let Some(instance) = key.strip_prefix("alive/") {
            // A heartbeat never stops a restore: an unreadable one is no heartbeat.
            match value.map(Heartbeat::decode) {
                Some(Ok(beat)) => {
                    self.heartbeats.insert(instance.to_owned(), beat);
                }
                _ => {
                    self.heartbeats.remove(instance);
                }
            }
        } else if let Some(instance) = key.strip_prefix("started/") {
            // Any value marks the topic as started: even one this build cannot read.
            match value {
                Some(bytes) => {
                    let marker = Started::decode(bytes).unwrap_or(Started {
                        at: DateTime::<Utc>::UNIX_EPOCH,
                        rebuild: false,
                        streams: None,
                    });
                    self.started.insert(instance.to_owned(), marker);
                }
                None => {
                    self.started.remove(instance);
                }
            }
        } else if let Some(scope) = key.strip_prefix("cursor/") {
            match value {
                Some(bytes) => {
                    self.cursors.insert(
                        scope.to_owned(),
                        Cursor::decode(bytes).map_err(|e| format!("{key}: {e}"))?,
                    );
                }
                None => {
                    self.cursors.remove(scope);
                }
            }
        } else if let Some(scope) = key.strip_prefix("segments/") {
            // A bound is never tombstoned; an unreadable one stops the restore, as a
            // segment does (numbers could be reused otherwise).
            if let Some(bytes) = value {
                let counter = SegmentCounter::decode(bytes).map_err(|e| format!("{key}: {e}"))?;
                let map = match self.fingerprints.get_mut(scope) {
                    Some(map) => map,
                    None => self.fingerprints.entry(scope.to_owned()).or_default(),
                };
                map.restore_counter(counter);
            }
        } else if let Some(rest) = key.strip_prefix("fps/") {
            let parsed = rest
                .split_once('/')
                .and_then(|(n, scope)| Some((n.parse::<u32>().ok()?, scope)));
            let Some((segment, scope)) = parsed.filter(|(n, _)| *n != LEGACY) else {
                return Err(format!("{key}: not fps/<n>/<scope>"));
            };
            let map = match self.fingerprints.get_mut(scope) {
                Some(map) => map,
                None => self.fingerprints.entry(scope.to_owned()).or_default(),
            };
            map.restore_segment(segment, value)
                .map_err(|e| format!("{key}: {e}"))?;
        } else if let Some(rest) = key.strip_prefix("fp/") {
            let Some((stream, id)) = rest.split_once('/') else {
                return Err(format!("{key}: not fp/<stream>/<id>"));
            };
            let entry = match value {
                Some(bytes) => Some(FpEntry::decode(bytes).map_err(|e| format!("{key}: {e}"))?),
                None => None,
            };
            // Millions of records pass here at start-up: find the map without allocating.
            let scope: &str = match (stream, id.rsplit_once(':')) {
                ("positions", Some((tag, _))) => {
                    self.scratch.clear();
                    self.scratch.push_str("positions/");
                    self.scratch.push_str(tag);
                    &self.scratch
                }
                _ => stream,
            };
            let map = match self.fingerprints.get_mut(scope) {
                Some(map) => map,
                None => self.fingerprints.entry(scope.to_owned()).or_default(),
            };
            let local = local_id(stream, id);
            let entity = EntityKey::of(local);
            match entry {
                Some(entry) => map.insert(entity, entry, local),
                // A per-entity tombstone forgets only what that record held: a segment
                // written after it holds a newer entry.
                None if map.map.get(&entity).is_some_and(|s| s.segment == LEGACY) => {
                    map.remove(entity)
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Ends a restore: entities whose latest segment was tombstoned are forgotten.
    pub fn finish(&mut self) {
        for map in self.fingerprints.values_mut() {
            map.finish_restore();
        }
        self.fingerprints.retain(|_, map| !map.is_blank());
    }

    /// Returns whether the state shows that runs made progress on this topic: a cursor, a
    /// fingerprint (or a scope's segment numbering), or a start marker, of any stream and
    /// any instance. Barriers, heartbeats and unknown keys are no progress (a refused start
    /// or `ibstream state` writes them). A state topic may be shared by instances that split
    /// the streams: whether one stream's state was lost is [`State::holds_progress_of`].
    pub fn holds_progress(&self) -> bool {
        !self.cursors.is_empty() || !self.fingerprints.is_empty() || !self.started.is_empty()
    }

    /// Returns whether the state shows progress of `stream` for the instance `instance_id`:
    /// a cursor or fingerprints (a segment numbering included) of one of the stream's scopes
    /// (`<stream>` or `<stream>/…`: only the instance running a stream writes them), or the
    /// start marker of `instance_id` covering the stream. Another instance's marker, or its
    /// progress on other streams, says nothing of this stream: see "A lost state".
    pub fn holds_progress_of(&self, stream: &str, instance_id: &str) -> bool {
        let of_stream = |scope: &String| {
            scope
                .strip_prefix(stream)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        self.cursors.keys().any(of_stream)
            || self.fingerprints.keys().any(of_stream)
            || self
                .started
                .get(instance_id)
                .is_some_and(|marker| marker.covers(stream))
    }

    /// Returns the number of remembered entities.
    pub fn entities(&self) -> usize {
        self.fingerprints.values().map(FpMap::len).sum()
    }
}

/// Returns the key of an entity inside its scope's map (positions: the position id alone).
pub fn key_in_scope(stream: &str, id: &str) -> EntityKey {
    EntityKey::of(local_id(stream, id))
}

/// Returns an entity's id inside its scope (positions: the position id without its tag).
pub fn local_id<'a>(stream: &str, id: &'a str) -> &'a str {
    match (stream, id.rsplit_once(':')) {
        ("positions", Some((_, position))) => position,
        _ => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_versions_are_checked() {
        let mut cursor = Cursor {
            watermark: NaiveDate::from_ymd_opt(2024, 5, 1),
            ..Cursor::default()
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        // Without open windows or a sweep the value is what the first release wrote.
        assert_eq!(
            cursor.encode(),
            br#"{"v":1,"watermark":"2024-05-01","next":null}"#.to_vec()
        );
        let now = DateTime::parse_from_rfc3339("2024-05-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        cursor.open_day(NaiveDate::from_ymd_opt(2024, 4, 20).unwrap(), 3, now);
        cursor.open_day(NaiveDate::from_ymd_opt(2024, 4, 10).unwrap(), 1, now);
        cursor.open_day(
            NaiveDate::from_ymd_opt(2024, 4, 20).unwrap(),
            2,
            now + chrono::Duration::hours(1),
        );
        cursor.swept = Some(now);
        assert_eq!(cursor.open.len(), 2);
        assert_eq!(
            cursor.open[0].day,
            NaiveDate::from_ymd_opt(2024, 4, 10).unwrap()
        );
        assert_eq!((cursor.open[1].missing, cursor.open[1].since), (2, now));
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        assert!(Cursor::decode(br#"{"v":2,"watermark":null,"next":null}"#).is_err());
        let entry = FpEntry {
            fp: u64::MAX - 7,
            day: -3,
        };
        assert_eq!(FpEntry::decode(&entry.encode()).unwrap(), entry);
        let mut v2 = entry.encode();
        v2[0] = 2;
        assert!(FpEntry::decode(&v2).is_err());
    }

    #[test]
    fn entity_keys_keep_numeric_ids_exactly() {
        assert_eq!(EntityKey::of("9000123").id().as_deref(), Some("9000123"));
        assert_eq!(EntityKey::of("0").id().as_deref(), Some("0"));
        assert_eq!(
            EntityKey::of("0123").id(),
            None,
            "leading zeros would not round-trip"
        );
        assert_eq!(EntityKey::of("mt4-live-01").id(), None);
        assert_ne!(EntityKey::of("mt4-live-01"), EntityKey::of("mt5-live-02"));
        assert_ne!(
            EntityKey::of("18446744073709551615"),
            EntityKey::of("9223372036854775807")
        );
    }

    #[test]
    fn state_applies_records_and_tombstones() {
        let mut state = State::default();
        let e = FpEntry { fp: 1, day: 10 };
        state.apply("fp/leads/100", Some(&e.encode())).unwrap();
        state
            .apply("fp/positions/mt4-live-01:77", Some(&e.encode()))
            .unwrap();
        state
            .apply(
                "fp/positions/mt4-live-01:dlq-0011223344556677",
                Some(&e.encode()),
            )
            .unwrap();
        assert_eq!(
            state.fingerprints["positions/mt4-live-01"]
                .stale_before(11)
                .into_iter()
                .map(|(_, id)| id)
                .collect::<std::collections::BTreeSet<_>>(),
            ["77", "dlq-0011223344556677"]
                .map(String::from)
                .into_iter()
                .collect(),
            "restored hashed ids keep their names"
        );
        state
            .apply("fp/positions/mt4-live-01:dlq-0011223344556677", None)
            .unwrap();
        state
            .apply("cursor/transactions", Some(&Cursor::default().encode()))
            .unwrap();
        state.apply("barrier/x", Some(b"nonce")).unwrap();
        assert_eq!(state.entities(), 2);
        assert_eq!(
            state.fingerprints["positions/mt4-live-01"].get(EntityKey::of("77")),
            Some(e)
        );
        state.apply("fp/leads/100", None).unwrap();
        assert_eq!(state.entities(), 1);
        assert!(state.apply("fp/leads/100", Some(b"\x09")).is_err());
    }

    #[test]
    fn only_progress_counts_as_a_state_never_barriers_or_heartbeats() {
        let mut state = State::default();
        let beat = Heartbeat { at: Utc::now() };
        state.apply("barrier/i", Some(b"n1")).unwrap();
        state.apply("barrier/i/tools", Some(b"n2")).unwrap();
        state.apply("check/i", Some(b"2026-01-01")).unwrap();
        state.apply("alive/i", Some(&beat.encode())).unwrap();
        state.finish();
        assert!(
            !state.holds_progress(),
            "what refused starts and tools write"
        );
        let marker = Started {
            at: beat.at,
            rebuild: true,
            streams: Some(vec!["leads".to_owned()]),
        };
        assert_eq!(Started::decode(&marker.encode()).unwrap(), marker);
        state.apply("started/i", Some(&marker.encode())).unwrap();
        assert!(state.holds_progress());
        let mut cursor_only = State::default();
        cursor_only
            .apply("cursor/transactions", Some(&Cursor::default().encode()))
            .unwrap();
        assert!(cursor_only.holds_progress());
        let mut fps_only = State::default();
        fps_only
            .apply("fps/3/leads", Some(&[SEGMENT_VERSION]))
            .unwrap();
        fps_only.finish();
        assert!(
            fps_only.holds_progress(),
            "an emptied scope still numbers on"
        );
    }

    #[test]
    fn a_shared_state_topic_proves_progress_per_stream_and_instance() {
        let now = Utc::now();
        let marker = |streams: Option<&[&str]>| {
            Started {
                at: now,
                rebuild: false,
                streams: streams.map(|s| s.iter().map(|s| (*s).to_owned()).collect()),
            }
            .encode()
        };
        // Instance a runs leads on the shared topic; b's own state was lost.
        let mut state = State::default();
        state
            .apply(
                "cursor/leads/registration",
                Some(&Cursor::default().encode()),
            )
            .unwrap();
        state
            .apply("fps/0/leads", Some(&[SEGMENT_VERSION]))
            .unwrap();
        state
            .apply("started/a", Some(&marker(Some(&["leads"]))))
            .unwrap();
        state.finish();
        assert!(state.holds_progress(), "the dead-letter topic's rule");
        assert!(state.holds_progress_of("leads", "a"));
        assert!(state.holds_progress_of("leads", "b"), "a handed leads over");
        assert!(!state.holds_progress_of("transactions", "b"));
        assert!(!state.holds_progress_of("transactions", "a"), "not listed");
        // Only scopes of the stream itself count (`leads` is no prefix of `leadsX`).
        state
            .apply("cursor/leadsX", Some(&Cursor::default().encode()))
            .unwrap();
        assert!(!state.holds_progress_of("leadsX/registration", "b"));
        assert!(!state.holds_progress_of("lead", "b"));
        // Another instance's marker without a list (an earlier release) covers only its own.
        state.apply("started/a", Some(&marker(None))).unwrap();
        assert!(state.holds_progress_of("transactions", "a"));
        assert!(!state.holds_progress_of("transactions", "b"));
        // b's own marker covers the streams it lists, an earlier release's every stream.
        state
            .apply("started/b", Some(&marker(Some(&["transactions"]))))
            .unwrap();
        assert!(state.holds_progress_of("transactions", "b"));
        assert!(!state.holds_progress_of("positions", "b"));
        state.apply("started/b", Some(&marker(None))).unwrap();
        assert!(state.holds_progress_of("positions", "b"));
        // A stream's own cursor or fingerprints, whoever wrote them.
        let mut positions = State::default();
        positions
            .apply(
                "cursor/positions/mt4-live-01",
                Some(&Cursor::default().encode()),
            )
            .unwrap();
        positions
            .apply(
                "segments/servers",
                Some(&SegmentCounter { next: 1 }.encode()),
            )
            .unwrap();
        positions.finish();
        assert!(positions.holds_progress_of("positions", "b"));
        assert!(positions.holds_progress_of("servers", "b"));
        assert!(!positions.holds_progress_of("transactions", "b"));
    }

    #[test]
    fn pruning_returns_what_it_forgot() {
        let mut map = FpMap::default();
        for (id, day) in [
            ("1", 5),
            ("2", 9),
            ("3", 10),
            ("x-1", 1),
            ("dlq-00ff00ff00ff00ff", 2),
            ("y-2", 12),
        ] {
            map.insert(EntityKey::of(id), FpEntry { fp: 0, day }, id);
        }
        let mut stale: Vec<String> = map.stale_before(10).into_iter().map(|(_, id)| id).collect();
        stale.sort();
        // Hashed ids (a dead-letter marker, a non-numeric id) are pruned like numeric ones.
        assert_eq!(stale, vec!["1", "2", "dlq-00ff00ff00ff00ff", "x-1"]);
        assert_eq!(
            map.len(),
            6,
            "nothing is forgotten before the tombstones are committed"
        );
        map.remove(EntityKey::of("x-1"));
        assert_eq!(map.stale_before(10).len(), 3);
    }

    /// Replays state records into a fresh state, as a restore does.
    fn replay(log: &[(String, Option<Vec<u8>>)]) -> State {
        let mut state = State::default();
        for (key, value) in log {
            state.apply(key, value.as_deref()).unwrap();
        }
        state.finish();
        state
    }

    /// What compaction leaves of a log: the last record of each key, tombstones gone.
    fn compacted(log: &[(String, Option<Vec<u8>>)]) -> Vec<(String, Option<Vec<u8>>)> {
        compacted_keeping_tombstones(log)
            .into_iter()
            .filter(|(_, value)| value.is_some())
            .collect()
    }

    /// What a compaction within `delete.retention.ms` leaves: the last record of each key,
    /// tombstones still there.
    fn compacted_keeping_tombstones(
        log: &[(String, Option<Vec<u8>>)],
    ) -> Vec<(String, Option<Vec<u8>>)> {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, (key, _)) in log.iter().enumerate() {
            last.insert(key, i);
        }
        log.iter()
            .enumerate()
            .filter(|(i, (key, _))| last[key.as_str()] == *i)
            .map(|(_, r)| r.clone())
            .collect()
    }

    #[test]
    fn segments_restore_exactly_what_memory_holds_through_changes_prunes_and_compaction() {
        let mut rng = fastrand::Rng::with_seed(5);
        for round in 0..20 {
            let mut log: Vec<(String, Option<Vec<u8>>)> = Vec::new();
            // Start from what an earlier release wrote: per-entity records.
            for id in 0..50u64 {
                let entry = FpEntry { fp: id, day: 1 };
                log.push((legacy_key("leads", &id.to_string()), Some(entry.encode())));
            }
            let mut map = replay(&log).fingerprints.remove("leads").unwrap();
            let mut pruned = std::collections::HashSet::new();
            for step in 0..80 {
                let (records, plan) = match rng.u8(..13) {
                    // A restart: the poller goes on with what a restore gives it, from the
                    // log as it is or after the broker compacted it (numbering included).
                    10 => {
                        log = match rng.u8(..3) {
                            0 => log,
                            1 => compacted_keeping_tombstones(&log),
                            _ => compacted(&log),
                        };
                        map = replay(&log)
                            .fingerprints
                            .remove("leads")
                            .unwrap_or_default();
                        continue;
                    }
                    // The scope empties: every entity pruned at once, as an idle append-only
                    // scope is, or dropped as `state reset --resnapshot` does.
                    // Every segment is tombstoned then: no entity may come back.
                    11 => {
                        let keys: Vec<EntityKey> = map.map.keys().copied().collect();
                        pruned.clear();
                        map.plan_remove("leads", &keys)
                    }
                    0 => {
                        let keys: Vec<EntityKey> = map
                            .stale_before(rng.i32(0..40))
                            .into_iter()
                            .map(|(k, _)| k)
                            .collect();
                        pruned.extend(keys.iter().copied());
                        map.plan_remove("leads", &keys)
                    }
                    1 => match map.plan_compaction("leads", 30) {
                        Some(planned) => planned,
                        None => continue,
                    },
                    _ => {
                        let changes: Vec<_> = (0..rng.usize(1..40))
                            .map(|_| {
                                let id = rng.u64(0..120);
                                let (key, name) = if id % 17 == 0 {
                                    let name = format!("dlq-{id:016x}");
                                    (EntityKey::of(&name), Some(name.into_boxed_str()))
                                } else {
                                    (EntityKey(id), None)
                                };
                                let entry = FpEntry {
                                    fp: rng.u64(..),
                                    day: rng.i32(0..40),
                                };
                                (key, entry, name)
                            })
                            .collect();
                        for (key, ..) in &changes {
                            pruned.remove(key);
                        }
                        map.plan_write("leads", &changes)
                    }
                };
                log.extend(records);
                map.apply(plan);
                for restored in [
                    replay(&log),
                    replay(&compacted_keeping_tombstones(&log)),
                    replay(&compacted(&log)),
                ] {
                    let got = restored
                        .fingerprints
                        .get("leads")
                        .cloned()
                        .unwrap_or_default();
                    for (key, slot) in &map.map {
                        let entry = FpEntry {
                            fp: slot.fp,
                            day: slot.day,
                        };
                        assert_eq!(got.get(*key), Some(entry), "round {round} step {step}");
                    }
                    // Only pruned entities may come back (their segment still lives).
                    for key in got.map.keys() {
                        assert!(
                            map.map.contains_key(key) || pruned.contains(key),
                            "round {round} step {step}: {key:?} came back unpruned"
                        );
                    }
                    assert_eq!(
                        got.stale_before(i32::MAX).len(),
                        got.len(),
                        "every restored id has its name"
                    );
                }
            }
            // Segments, not entities, make the state: far fewer records than entries.
            let live_records = compacted(&log)
                .iter()
                .filter(|(key, _)| !key.starts_with("segments/"))
                .count();
            assert!(
                live_records <= map.len(),
                "{live_records} records for {} entities",
                map.len()
            );
        }
    }

    #[test]
    fn a_segment_record_replaces_a_page_of_per_entity_records() {
        let mut map = FpMap::default();
        let changes: Vec<_> = (0..1_000u64)
            .map(|id| (EntityKey(id), FpEntry { fp: id, day: 3 }, None))
            .collect();
        let (first, plan) = map.plan_write("positions/mt4-live-01", &changes);
        // The numbering bound first (once per SEGMENT_RESERVE segments), then the segment.
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].0, "segments/positions/mt4-live-01");
        assert_eq!(
            SegmentCounter::decode(first[0].1.as_ref().unwrap()).unwrap(),
            SegmentCounter {
                next: 1 + SEGMENT_RESERVE
            }
        );
        assert_eq!(first[1].0, "fps/0/positions/mt4-live-01");
        assert_eq!(first[1].1.as_ref().unwrap().len(), 1 + 1_000 * 21);
        map.apply(plan);
        // The same entities again: a new segment, and the old one tombstoned.
        let (records, plan) = map.plan_write("positions/mt4-live-01", &changes);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, "fps/1/positions/mt4-live-01");
        assert_eq!(records[1], ("fps/0/positions/mt4-live-01".to_owned(), None));
        map.apply(plan);
        assert_eq!(map.segments(), 1);
        let restored = replay(&records);
        assert_eq!(restored.fingerprints["positions/mt4-live-01"].len(), 1_000);
        assert!(State::default().apply("fps/x/leads", Some(&[2])).is_err());
        assert!(State::default().apply("fps/1/leads", Some(&[3])).is_err());
        assert!(State::default()
            .apply("fps/1/leads", Some(&[2, 0, 1]))
            .is_err());
    }
}
