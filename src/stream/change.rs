//! Change detection: CREATED / UPDATED / unchanged, from a record's fingerprint
//! ([`crate::crm::fingerprint`]) against the one stored for its entity.
//!
//! A stored fingerprint equal to the legacy one ([`legacy`]) of the record read is unchanged
//! ([`compare`]), so an upgrade re-emits nothing – except for a record holding a value earlier
//! releases emitted wrong (a date they misread, see
//! [`crate::crm::time::read_differently_than_before`]): its fingerprint is marked
//! ([`crate::crm::fingerprint::Reading::Changed`]), so it differs from the stored one even
//! without sets, and it is `UPDATED` once with the corrected value and a new `eventId`. The
//! `eventId` of a change is a hash of (stream, entity id, previous fingerprint, fingerprint): a
//! retry of the same change gets the same id, whatever the delivery mode, and a record that
//! changes back (A → B → A) gets a new id for its second A.

use chrono::NaiveDate;
use xxhash_rust::xxh3::xxh3_64;

use crate::crm::fingerprint::{fingerprint_fields, legacy};
use crate::crm::raw::Fields;
use crate::events::Op;

/// Returns the deterministic event id of a change from `previous` (the fingerprint last
/// emitted for the entity, `None` for a new one) to `fingerprint`: 16 hex digits.
pub fn event_id(stream: &str, id: &str, previous: Option<u64>, fingerprint: u64) -> String {
    let mut bytes = Vec::with_capacity(stream.len() + id.len() + 20);
    bytes.extend_from_slice(stream.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(0);
    match previous {
        Some(previous) => {
            bytes.push(1);
            bytes.extend_from_slice(&previous.to_le_bytes());
        }
        None => bytes.push(0),
    }
    bytes.extend_from_slice(&fingerprint.to_le_bytes());
    format!("{:016x}", xxh3_64(&bytes))
}

/// What a record read now is, against the fingerprint stored for its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compared {
    /// New or changed: emit it.
    Changed(Op),
    /// Unchanged: drop it.
    Unchanged,
    /// Unchanged, but the stored fingerprint is the one an earlier release computed
    /// ([`legacy`]): drop it and store the fingerprint of this release in its place.
    Restamp,
}

/// Compares a record (fingerprint `fp`, JSON text `raw` as received) with the fingerprint
/// stored for its entity (`None`: never emitted). The legacy fingerprint is computed only when
/// the two differ, so an unchanged record costs nothing more.
///
/// A legacy match is unchanged only for a record whose fingerprint is unmarked
/// ([`crate::crm::fingerprint::Reading::AsBefore`]): one marked holds a value the earlier
/// release emitted wrong (a date it misread), so it is `UPDATED` with the corrected value,
/// once, its `eventId` from the legacy fingerprint to the marked one.
pub fn compare(previous: Option<u64>, fp: u64, raw: &str, volatile: &[String]) -> Compared {
    match classify(previous, fp) {
        None => Compared::Unchanged,
        Some(Op::Updated) if previous.is_some_and(|p| legacy_match(p, fp, raw, volatile)) => {
            Compared::Restamp
        }
        Some(op) => Compared::Changed(op),
    }
}

/// Returns whether `previous` is the legacy fingerprint of a record's JSON text (an object)
/// and `fp` its unmarked fingerprint (every value read as before).
fn legacy_match(previous: u64, fp: u64, raw: &str, volatile: &[String]) -> bool {
    let Ok(fields) = Fields::parse(raw) else {
        return false;
    };
    let mut buffer = Vec::new();
    previous == legacy::fingerprint_fields(&fields, volatile, &mut buffer)
        && fp == fingerprint_fields(&fields, volatile, &mut buffer)
}

/// Days a record's own day may lie outside the window it was read from before it is flagged:
/// a CRM filtering its days in another zone than the one configured puts records near
/// midnight a day out, which is no fault of the record.
pub const OUTSIDE_WINDOW_DAYS: i64 = 2;

/// The day an append-only fingerprint is kept by (pruned once the re-read horizon passes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptDay {
    /// The day; `None` without a record day or a window (unwindowed, mutable streams).
    pub day: Option<NaiveDate>,
    /// How many days the record's own day lies outside its window, when more than
    /// [`OUTSIDE_WINDOW_DAYS`] (a date in other units, a wrong year, a placeholder that is a
    /// real instant): the record is flagged.
    pub outside_by: Option<i64>,
}

/// Returns the day a record's fingerprint is kept by: its own day (`record_day`) when it lies
/// in `window` (the days it was read from, inclusive), else the window's last day.
///
/// The CRM returned the record for a query of `window`'s days, so its day in the CRM lies in
/// it, whatever the record's date says; re-reads that can return it again are of windows
/// holding that day. A record dated outside the window is kept by the window's last day: kept
/// by its own day, a record dated years off (epoch seconds read as milliseconds: 1970) would be
/// pruned at once and re-emitted as `CREATED` at every re-read. A record dated inside the
/// window is kept by its own day in the configured zone, which may be a day before the day
/// the CRM files it under (a CRM whose day ends at another hour than `crm.timezone`'s: 23:30
/// UTC on D-1 is D for a CRM in UTC+2); [`prune_before`] keeps a day's margin for that, so
/// the kept day alone does not guarantee the fingerprint outlives every re-read.
pub fn kept_day(record_day: Option<NaiveDate>, window: Option<(NaiveDate, NaiveDate)>) -> KeptDay {
    let Some((from, to)) = window else {
        return KeptDay {
            day: record_day,
            outside_by: None,
        };
    };
    let outside = match record_day {
        Some(day) if day < from => (from - day).num_days(),
        Some(day) if day > to => (day - to).num_days(),
        Some(day) => {
            return KeptDay {
                day: Some(day),
                outside_by: None,
            }
        }
        None => 0,
    };
    KeptDay {
        day: Some(to),
        outside_by: (outside > OUTSIDE_WINDOW_DAYS).then_some(outside),
    }
}

/// Days of margin pruning keeps below the re-read horizon: a record's own day in
/// `crm.timezone` may be a day before the day the CRM files it under (its day boundary in
/// another zone, at most 26 hours apart), and a re-read of the CRM's day must still find its
/// fingerprint (or emit it as `CREATED` again).
pub const PRUNE_MARGIN_DAYS: i64 = 1;

/// Returns the day before which append-only fingerprints are pruned when `horizon` is the
/// first day any re-read may still return (fingerprints kept by a day `>= horizon - 1` stay;
/// see [`PRUNE_MARGIN_DAYS`]).
pub fn prune_before(horizon: NaiveDate) -> NaiveDate {
    horizon - chrono::Duration::days(PRUNE_MARGIN_DAYS)
}

/// Compares a record's fingerprint with the one last emitted for its entity (`None`: never
/// emitted); `None` means unchanged.
pub fn classify(previous: Option<u64>, fp: u64) -> Option<Op> {
    match previous {
        None => Some(Op::Created),
        Some(old) if old != fp => Some(Op::Updated),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crm::fingerprint::tests::{fp, legacy_fp, LEAD};

    #[test]
    fn a_real_change_of_a_tag_or_an_account_is_a_change() {
        for changed in [
            // A tag replaced, added, moved to another category; a category renamed.
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip2"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip", "new"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar"]}, {"category": "Sales", "tags": ["hot", "vip"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing2", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            // A duplicate tag (sets compare as multisets).
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live)"}"#,
            // An account added, removed, moved to another server, of another type.
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live), (88112, mt5-live-02, live), (9, mt4-live-01, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt5-live-02, live), (88112, mt5-live-02, live)"}"#,
            r#"{"id": 7, "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}, {"category": "Sales", "tags": ["hot"]}], "userAdditionalId": "(12345, mt4-live-01, demo), (88112, mt5-live-02, live)"}"#,
        ] {
            assert_ne!(fp(changed), fp(LEAD), "{changed}");
            // Against a state an earlier release wrote, and one this release wrote.
            for stored in [legacy_fp(LEAD), fp(LEAD)] {
                assert_eq!(
                    compare(Some(stored), fp(changed), changed, &[]),
                    Compared::Changed(Op::Updated),
                    "{changed}"
                );
            }
        }
    }

    #[test]
    fn fingerprints_an_earlier_release_stored_match_the_unchanged_record() {
        // An earlier release hashed the fields as received; this one sorts the sets.
        let old = legacy_fp(LEAD);
        assert_ne!(old, fp(LEAD));
        // The same record read after the upgrade: unchanged, its new fingerprint stored.
        assert_eq!(compare(Some(old), fp(LEAD), LEAD, &[]), Compared::Restamp);
        assert_eq!(
            compare(Some(fp(LEAD)), fp(LEAD), LEAD, &[]),
            Compared::Unchanged
        );
        assert_eq!(
            compare(None, fp(LEAD), LEAD, &[]),
            Compared::Changed(Op::Created)
        );
        // Volatile fields are left out of the legacy form as well.
        let volatile = vec!["balanceUsd".to_owned()];
        let with_balance = r#"{"customerId": 1, "balanceUsd": "5.00", "userAdditionalId": "(2, b, live), (1, a, live)"}"#;
        let fields = Fields::parse(with_balance).unwrap();
        let stored = legacy::fingerprint_fields(&fields, &volatile, &mut Vec::new());
        let now = fingerprint_fields(&fields, &volatile, &mut Vec::new());
        assert_eq!(
            compare(Some(stored), now, with_balance, &volatile),
            Compared::Restamp
        );
        // Records without set-valued fields fingerprint as they always did.
        let plain = r#"{"id": 3, "amount": "1.50"}"#;
        assert_eq!(fp(plain), legacy_fp(plain));
    }

    #[test]
    fn a_date_the_earlier_release_misread_is_corrected_once_after_the_upgrade() {
        use crate::crm::models::{Customer, Transaction};
        use crate::crm::page::read_text;
        let tz = chrono_tz::Tz::UTC;
        let volatile = vec!["balanceUsd".to_owned()];
        // The earlier release read 1764500000 as milliseconds (1970-01-21), emitted that and
        // stored the fingerprint of this text.
        let text = r#"{"customerId": 5501, "ftdDate": 1764500000, "balanceUsd": "3.00", "tags": [{"category": "b", "tags": ["y", "x"]}]}"#;
        let fields = Fields::parse(text).unwrap();
        let stored = legacy::fingerprint_fields(&fields, &volatile, &mut Vec::new());
        let created_before = event_id("customers", "5501", None, stored);
        let record = read_text::<Customer>(text, tz, &volatile, &mut Vec::new()).unwrap();
        assert_eq!(
            record.model.ftd_date.unwrap().to_rfc3339(),
            "2025-11-30T10:53:20+00:00"
        );
        // One UPDATED, from the stored fingerprint, with an id the old release never used.
        assert_eq!(
            compare(Some(stored), record.fp, text, &volatile),
            Compared::Changed(Op::Updated)
        );
        let updated = event_id("customers", "5501", Some(stored), record.fp);
        assert_ne!(updated, created_before);
        // Then stored: unchanged at every later read.
        assert_eq!(
            compare(Some(record.fp), record.fp, text, &volatile),
            Compared::Unchanged
        );
        // Without sets the fingerprint would otherwise be the stored one (no event at all).
        let plain = r#"{"customerId": 5502, "ftdDate": "1764500000"}"#;
        let stored = legacy_fp(plain);
        let record = read_text::<Customer>(plain, tz, &[], &mut Vec::new()).unwrap();
        assert_eq!(
            compare(Some(stored), record.fp, plain, &[]),
            Compared::Changed(Op::Updated)
        );
        // A transaction pruned and read again is CREATED with another id than the 1970 one.
        let tx = r#"{"id": 77, "transactionDate": 1764500000, "amount": "10.00"}"#;
        let record = read_text::<Transaction>(tx, tz, &[], &mut Vec::new()).unwrap();
        assert_eq!(
            compare(None, record.fp, tx, &[]),
            Compared::Changed(Op::Created)
        );
        assert_ne!(
            event_id("transactions", "77", None, record.fp),
            event_id("transactions", "77", None, legacy_fp(tx))
        );
        // Records read as before: no event, restamped only when their sets are reordered.
        let same = r#"{"customerId": 5503, "ftdDate": 1764500000123, "registrationDate": "2025-11-30 10:53:20", "tags": [{"category": "b", "tags": ["y", "x"]}]}"#;
        let record = read_text::<Customer>(same, tz, &[], &mut Vec::new()).unwrap();
        assert_eq!(
            compare(Some(legacy_fp(same)), record.fp, same, &[]),
            Compared::Restamp
        );
        let same = r#"{"customerId": 5504, "ftdDate": 1764500000123, "status": "Active"}"#;
        let record = read_text::<Customer>(same, tz, &[], &mut Vec::new()).unwrap();
        assert_eq!(
            compare(Some(legacy_fp(same)), record.fp, same, &[]),
            Compared::Unchanged
        );
        // A volatile date field is no part of the fingerprint: not marked.
        let vol = vec!["ftdDate".to_owned()];
        let record = read_text::<Customer>(plain, tz, &vol, &mut Vec::new()).unwrap();
        assert_eq!(
            record.fp,
            fingerprint_fields(&Fields::parse(plain).unwrap(), &vol, &mut Vec::new())
        );
    }

    #[test]
    fn fingerprints_are_kept_by_the_window_s_day_unless_the_record_s_lies_in_it() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let window = Some((d("2026-11-01"), d("2026-11-03")));
        let kept = |day: Option<&str>| kept_day(day.map(d), window);
        // Inside: its own day.
        assert_eq!(kept(Some("2026-11-02")).day, Some(d("2026-11-02")));
        assert_eq!(kept(Some("2026-11-01")).outside_by, None);
        // Outside, near (a zone's midnight): the window's last day, not flagged.
        for near in ["2026-10-30", "2026-10-31", "2026-11-04", "2026-11-05"] {
            assert_eq!(
                kept(Some(near)),
                KeptDay {
                    day: Some(d("2026-11-03")),
                    outside_by: None
                },
                "{near}"
            );
        }
        // Far outside: the window's last day, flagged with the distance.
        assert_eq!(
            kept(Some("1970-01-21")),
            KeptDay {
                day: Some(d("2026-11-03")),
                outside_by: Some((d("2026-11-01") - d("1970-01-21")).num_days())
            }
        );
        assert_eq!(kept(Some("2026-11-06")).outside_by, Some(3));
        assert_eq!(kept(Some("2026-10-29")).outside_by, Some(3));
        // No date: the window's last day; no window: its own day.
        assert_eq!(kept(None).day, Some(d("2026-11-03")));
        assert_eq!(
            kept_day(Some(d("1970-01-01")), None).day,
            Some(d("1970-01-01"))
        );
    }

    #[test]
    fn a_fingerprint_kept_by_its_own_day_outlives_the_horizon_of_the_crm_s_next_day() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        // Configured zone UTC, CRM in UTC+2: a record of 2026-11-01 23:30 UTC is the CRM's
        // 2026-11-02. Read in the window 11-01..11-02, it is kept by its own day, 11-01.
        let kept = kept_day(
            Some(d("2026-11-01")),
            Some((d("2026-11-01"), d("2026-11-02"))),
        );
        assert_eq!(kept.day, Some(d("2026-11-01")));
        // Pruning with the horizon at 11-02 (the sweep reads 11-02..today, which returns it
        // again) must keep it, or it is emitted as CREATED a second time.
        let pruned = |horizon: &str| kept.day.is_some_and(|day| day < prune_before(d(horizon)));
        assert!(!pruned("2026-11-02"));
        // A day later no re-read can return it: pruned.
        assert!(pruned("2026-11-03"));
    }

    #[test]
    fn classification_and_event_ids() {
        assert_eq!(classify(None, 5), Some(Op::Created));
        assert_eq!(classify(Some(5), 5), None);
        assert_eq!(classify(Some(5), 6), Some(Op::Updated));
        assert_eq!(
            event_id("leads", "7", None, 5),
            event_id("leads", "7", None, 5)
        );
        assert_ne!(
            event_id("leads", "7", None, 5),
            event_id("leads", "7", None, 6)
        );
        assert_ne!(
            event_id("leads", "7", None, 5),
            event_id("customers", "7", None, 5)
        );
        assert_eq!(event_id("leads", "7", None, 5).len(), 16);
    }

    #[test]
    fn a_record_that_changes_back_gets_a_new_event_id() {
        // A → B → A: three changes, three ids; each the same on every retry.
        let (a, b) = (11, 22);
        let ids = [
            event_id("transactions", "9", None, a),
            event_id("transactions", "9", Some(a), b),
            event_id("transactions", "9", Some(b), a),
        ];
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
        assert_ne!(ids[0], ids[2], "the second A is a change of its own");
        assert_eq!(ids[2], event_id("transactions", "9", Some(b), a));
        // `None` (new) and a previous fingerprint of 0 are different histories.
        assert_ne!(
            event_id("transactions", "9", None, a),
            event_id("transactions", "9", Some(0), a)
        );
    }
}
