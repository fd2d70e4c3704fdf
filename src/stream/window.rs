//! Day windows: what a cursor reads next, and how it moves.
//!
//! A cycle reads the days from its start (`next` when resuming an unfinished cycle, else
//! `watermark + 1 - lookback_days`, else the initial day) to today, in windows of
//! `window_days`. After a window is read completely, `next` moves past it and the watermark
//! moves to the window's last day – but never past the last *closed* day, the last day whose
//! end plus the closing lag has passed in the CRM's time zone.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;

use super::state::Cursor;

/// Returns today in the CRM's time zone.
pub fn today(now: DateTime<Utc>, tz: Tz) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// Returns the last day that ended at least `closing_lag` ago in the CRM's time zone.
pub fn last_closed_day(now: DateTime<Utc>, tz: Tz, closing_lag: Duration) -> NaiveDate {
    let day = (now - closing_lag).with_timezone(&tz).date_naive();
    day.pred_opt().unwrap_or(day)
}

/// Returns the first day of this cycle.
pub fn cycle_start(cursor: &Cursor, lookback_days: u32, initial: NaiveDate) -> NaiveDate {
    match (cursor.next, cursor.watermark) {
        (Some(next), _) => next,
        (None, Some(watermark)) => watermark + Duration::days(1 - i64::from(lookback_days)),
        (None, None) => initial,
    }
}

/// Splits `from..=to` into windows of at most `days` days.
pub fn windows(from: NaiveDate, to: NaiveDate, days: u32) -> Vec<(NaiveDate, NaiveDate)> {
    let mut out = Vec::new();
    let mut start = from;
    while start <= to {
        let end = (start + Duration::days(i64::from(days.max(1)) - 1)).min(to);
        out.push((start, end));
        start = end + Duration::days(1);
    }
    out
}

/// Splits a window in halves (for windows whose total is too large); `None` for one day.
pub fn halves(
    from: NaiveDate,
    to: NaiveDate,
) -> Option<((NaiveDate, NaiveDate), (NaiveDate, NaiveDate))> {
    let days = (to - from).num_days();
    (days >= 1).then(|| {
        let mid = from + Duration::days(days / 2);
        ((from, mid), (mid + Duration::days(1), to))
    })
}

/// Returns the cursor after the window ending `window_to` was read (its short days, if any,
/// are kept as open windows by the caller); open windows and the last sweep carry over.
pub fn advance(
    cursor: &Cursor,
    window_to: NaiveDate,
    today: NaiveDate,
    last_closed: NaiveDate,
) -> Cursor {
    let reached = window_to.min(last_closed);
    Cursor {
        watermark: Some(cursor.watermark.map_or(reached, |w| w.max(reached))),
        next: (window_to < today).then(|| window_to + Duration::days(1)),
        ..cursor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn backfill_then_steady_state() {
        let initial = d("2024-01-01");
        let today = d("2024-03-10");
        let closed = d("2024-03-09");
        let mut cursor = Cursor::default();
        let start = cycle_start(&cursor, 1, initial);
        let plan = windows(start, today, 31);
        assert_eq!(
            plan,
            vec![
                (d("2024-01-01"), d("2024-01-31")),
                (d("2024-02-01"), d("2024-03-02")),
                (d("2024-03-03"), d("2024-03-10"))
            ]
        );
        cursor = advance(&cursor, plan[0].1, today, closed);
        assert_eq!(
            cursor,
            Cursor {
                watermark: Some(d("2024-01-31")),
                next: Some(d("2024-02-01")),
                ..Cursor::default()
            }
        );
        // A crash here resumes at the next window.
        assert_eq!(cycle_start(&cursor, 1, initial), d("2024-02-01"));
        cursor = advance(&cursor, plan[1].1, today, closed);
        cursor = advance(&cursor, plan[2].1, today, closed);
        // Today is not closed: the watermark stops at yesterday, and the cycle is complete.
        assert_eq!(
            cursor,
            Cursor {
                watermark: Some(closed),
                ..Cursor::default()
            }
        );
        // Steady state: watermark + 1 - lookback .. today.
        assert_eq!(cycle_start(&cursor, 1, initial), d("2024-03-09"));
        assert_eq!(
            windows(d("2024-03-09"), today, 31),
            vec![(d("2024-03-09"), today)]
        );
    }

    #[test]
    fn the_watermark_waits_for_the_closing_lag() {
        let tz: Tz = "Europe/Nicosia".parse().unwrap();
        let lag = Duration::minutes(15);
        // 00:10 local on 2024-03-10 (UTC+2): the 9th ended only 10 minutes ago.
        let now = DateTime::parse_from_rfc3339("2024-03-09T22:10:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(today(now, tz), d("2024-03-10"));
        assert_eq!(last_closed_day(now, tz, lag), d("2024-03-08"));
        let later = now + Duration::minutes(6);
        assert_eq!(last_closed_day(later, tz, lag), d("2024-03-09"));
        // A watermark never moves back.
        let c = advance(
            &Cursor {
                watermark: Some(d("2024-03-09")),
                ..Cursor::default()
            },
            d("2024-03-10"),
            d("2024-03-10"),
            d("2024-03-08"),
        );
        assert_eq!(c.watermark, Some(d("2024-03-09")));
    }

    #[test]
    fn windows_split_in_halves_down_to_one_day() {
        assert_eq!(
            halves(d("2024-01-01"), d("2024-01-31")),
            Some((
                (d("2024-01-01"), d("2024-01-16")),
                (d("2024-01-17"), d("2024-01-31"))
            ))
        );
        assert_eq!(
            halves(d("2024-01-01"), d("2024-01-02")),
            Some((
                (d("2024-01-01"), d("2024-01-01")),
                (d("2024-01-02"), d("2024-01-02"))
            ))
        );
        assert_eq!(halves(d("2024-01-01"), d("2024-01-01")), None);
        assert!(windows(d("2024-02-01"), d("2024-01-01"), 31).is_empty());
    }
}
