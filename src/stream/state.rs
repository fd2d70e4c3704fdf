//! What ibstream remembers between runs, as records of the compacted state topic.
//!
//! Keys (UTF-8):
//! - `cursor/<scope>`: a [`Cursor`] as JSON `{"v":1,"watermark":"YYYY-MM-DD"|null,"next":…,
//!   "open":[{"day":"YYYY-MM-DD","since":RFC 3339,"missing":N}],"swept":RFC 3339}` (`open` and
//!   `swept` are left out when empty; a release that predates them ignores them). Scopes: `leads/registration`, `leads/lastModified`, `customers/registration`,
//!   `customers/lastModified`, `transactions`, `positions/<serverTag>`.
//! - `fp/<stream>/<id>`: the fingerprint of the last emitted version of an entity, 13 bytes:
//!   version `1`, fingerprint (u64 LE), day (i32 LE, days since 1970-01-01, the record's day
//!   for pruning append-only streams). A tombstone (null value) forgets the entity.
//! - `barrier/<instance_id>`: the start-up barrier (a nonce), see `kafka::restore`
//!   (`barrier/<instance_id>/tools`: the barrier of `ibstream state`).
//! - `alive/<instance_id>`: a running instance's heartbeat, JSON `{"v":1,"at":RFC 3339}`,
//!   written every 30 s; `ibstream state reset` refuses while it is fresh.
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

    /// Returns the id again, when the key holds it exactly.
    pub fn id(self) -> Option<String> {
        let raw = self.0;
        (raw & HASHED == 0).then(|| raw.to_string())
    }
}

/// Fingerprints of one stream (or one server tag of positions): ~30 bytes per entity.
///
/// Ids the [`EntityKey`] keeps only as a hash (dead-letter markers, server tags, non-numeric
/// ids of other CRMs) are also kept by name, so their state keys can be rebuilt to prune them.
#[derive(Debug, Default, Clone)]
pub struct FpMap {
    map: HashMap<EntityKey, FpEntry, BuildHasherDefault<IdHasher>>,
    names: HashMap<EntityKey, Box<str>, BuildHasherDefault<IdHasher>>,
}

impl FpMap {
    /// Returns the entry of an entity.
    pub fn get(&self, key: EntityKey) -> Option<FpEntry> {
        self.map.get(&key).copied()
    }

    /// Remembers an entity's entry; `id` is its id within the scope (`key`'s source).
    pub fn insert(&mut self, key: EntityKey, entry: FpEntry, id: &str) {
        if key.id().is_none() {
            self.names.insert(key, id.into());
        }
        self.map.insert(key, entry);
    }

    /// Forgets an entity.
    pub fn remove(&mut self, key: EntityKey) {
        self.map.remove(&key);
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

    /// Returns the entities whose day is before `day` (to prune), with their ids in the scope.
    pub fn stale_before(&self, day: i32) -> Vec<(EntityKey, String)> {
        self.map
            .iter()
            .filter(|(_, e)| {
                let entry_day = e.day;
                entry_day < day
            })
            .filter_map(|(k, _)| {
                let id = k.id().or_else(|| self.names.get(k).map(|n| n.to_string()));
                id.map(|id| (*k, id))
            })
            .collect()
    }
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

/// Everything restored from the state topic, by scope.
#[derive(Debug, Default)]
pub struct State {
    /// Cursors by scope.
    pub cursors: HashMap<String, Cursor>,
    /// Heartbeats by instance id.
    pub heartbeats: HashMap<String, Heartbeat>,
    /// Fingerprints by scope (`leads`, …, `positions/<tag>`).
    pub fingerprints: HashMap<String, FpMap>,
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
                None => map.remove(entity),
            }
        }
        Ok(())
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
}
