//! What ibstream remembers between runs, as records of the compacted state topic.
//!
//! Keys (UTF-8):
//! - `cursor/<scope>`: a [`Cursor`] as JSON `{"v":1,"watermark":"YYYY-MM-DD"|null,"next":…}`.
//!   Scopes: `leads/registration`, `leads/lastModified`, `customers/registration`,
//!   `customers/lastModified`, `transactions`, `positions/<serverTag>`.
//! - `fp/<stream>/<id>`: the fingerprint of the last emitted version of an entity, 13 bytes:
//!   version `1`, fingerprint (u64 LE), day (i32 LE, days since 1970-01-01, the record's day
//!   for pruning append-only streams). A tombstone (null value) forgets the entity.
//! - `barrier/<instance_id>`: the start-up barrier (a nonce), see `kafka::restore`.
//!
//! Values carry a format version so later releases can read what earlier ones wrote; an
//! unknown version is an error at start-up, never silently ignored.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// Format version of state values.
pub const STATE_VERSION: u8 = 1;

/// Progress of one cursor scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The last day read completely after it had ended (plus the closing lag).
    pub watermark: Option<NaiveDate>,
    /// Where an unfinished cycle resumes (backfill progress); `None` between cycles.
    pub next: Option<NaiveDate>,
}

#[derive(Serialize, Deserialize)]
struct CursorValue {
    v: u8,
    watermark: Option<NaiveDate>,
    next: Option<NaiveDate>,
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
        })
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
#[derive(Debug, Default, Clone)]
pub struct FpMap {
    map: HashMap<EntityKey, FpEntry, BuildHasherDefault<IdHasher>>,
}

impl FpMap {
    /// Returns the entry of an entity.
    pub fn get(&self, key: EntityKey) -> Option<FpEntry> {
        self.map.get(&key).copied()
    }

    /// Remembers an entity's entry.
    pub fn insert(&mut self, key: EntityKey, entry: FpEntry) {
        self.map.insert(key, entry);
    }

    /// Forgets an entity.
    pub fn remove(&mut self, key: EntityKey) {
        self.map.remove(&key);
    }

    /// Returns the number of entities.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Returns whether no entity is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Returns the exactly-keyed entities whose day is before `day` (to prune).
    pub fn stale_before(&self, day: i32) -> Vec<EntityKey> {
        self.map
            .iter()
            .filter(|(k, e)| {
                let entry_day = e.day;
                entry_day < day && k.id().is_some()
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Everything restored from the state topic, by scope.
#[derive(Debug, Default)]
pub struct State {
    /// Cursors by scope.
    pub cursors: HashMap<String, Cursor>,
    /// Fingerprints by scope (`leads`, …, `positions/<tag>`).
    pub fingerprints: HashMap<String, FpMap>,
    scratch: String,
}

impl State {
    /// Applies one state record (`None` value: a tombstone). Unknown key families are
    /// ignored (barriers, or keys of a later release).
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if let Some(scope) = key.strip_prefix("cursor/") {
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
            let entity = key_in_scope(stream, id);
            match entry {
                Some(entry) => map.insert(entity, entry),
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

/// Returns the fingerprint scope of an entity: its stream, or `positions/<tag>` for
/// positions (whose ids are `<tag>:<positionId>`).
pub fn fingerprint_scope(stream: &str, id: &str) -> String {
    match (stream, id.rsplit_once(':')) {
        ("positions", Some((tag, _))) => format!("positions/{tag}"),
        _ => stream.to_owned(),
    }
}

/// Returns the key of an entity inside its scope's map (positions: the position id alone).
pub fn key_in_scope(stream: &str, id: &str) -> EntityKey {
    match (stream, id.rsplit_once(':')) {
        ("positions", Some((_, position))) => EntityKey::of(position),
        _ => EntityKey::of(id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_versions_are_checked() {
        let cursor = Cursor {
            watermark: NaiveDate::from_ymd_opt(2024, 5, 1),
            next: None,
        };
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
        for (id, day) in [("1", 5), ("2", 9), ("3", 10), ("x-1", 1)] {
            map.insert(EntityKey::of(id), FpEntry { fp: 0, day });
        }
        let mut stale: Vec<String> = map
            .stale_before(10)
            .into_iter()
            .filter_map(EntityKey::id)
            .collect();
        stale.sort();
        assert_eq!(stale, vec!["1", "2"]);
        assert_eq!(
            map.len(),
            4,
            "nothing is forgotten before the tombstones are committed"
        );
    }
}
