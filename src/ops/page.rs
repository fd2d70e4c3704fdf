//! The status page at `/`: the `/status` document rendered as one HTML page for people.
//!
//! One source: the page is rendered from the very JSON `/status` serves
//! ([`super::http::status_json`]), never from the registry directly, so the two cannot
//! disagree. Server-rendered, no JavaScript; `<meta http-equiv="refresh">` reloads it every
//! [`REFRESH_SECS`]. Every text is HTML-escaped (error messages come from the CRM and Kafka).
//! Every figure cell carries `data-status`, the JSON pointer of its value in `/status`, and
//! `data-value`, that value as JSON: tests check the page against `/status` through them.

use std::fmt::Write;

use serde_json::Value;

/// Seconds between the page's reloads.
pub const REFRESH_SECS: u32 = 5;

/// Escapes `text` for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Returns a duration in seconds for people: `42 s`, `7 min`, `5.2 h`, `27.8 days`.
pub fn human_seconds(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

/// A figure cell: `shown` (escaped here) with the pointer and value it comes from.
fn cell(status: &Value, pointer: &str, shown: &str) -> String {
    let value = status.pointer(pointer).cloned().unwrap_or(Value::Null);
    format!(
        "<td data-status=\"{}\" data-value=\"{}\">{}</td>",
        escape(pointer),
        escape(&value.to_string()),
        escape(shown)
    )
}

fn text_of(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "–".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#f2f2f2}td.num,td[data-value]{font-variant-numeric:tabular-nums}\
.ready{color:#176117;font-weight:bold}.notready{color:#a11;font-weight:bold}\
.error{color:#a11}small{color:#666}";

/// Renders the status page from a `/status` document.
pub fn render(status: &Value) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let instance = text_of(status.get("instanceId"));
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>{} – ibstream status</title><style>{STYLE}</style></head><body>\n",
        escape(&instance)
    );
    let _ = writeln!(
        out,
        "<h1>ibstream <span id=\"instance\">{}</span></h1>",
        escape(&instance)
    );
    let ready = status.get("ready").and_then(Value::as_bool) == Some(true);
    out.push_str("<table id=\"process\">\n");
    let rows: [(&str, &str, String); 5] = [
        (
            "readiness",
            "/ready",
            if ready { "ready" } else { "not ready" }.to_owned(),
        ),
        (
            "why not ready",
            "/notReadyReason",
            text_of(status.get("notReadyReason")),
        ),
        ("delivery", "/delivery", text_of(status.get("delivery"))),
        ("version", "/version", text_of(status.get("version"))),
        (
            "up for",
            "/uptimeSeconds",
            status
                .get("uptimeSeconds")
                .and_then(Value::as_f64)
                .map_or("–".to_owned(), human_seconds),
        ),
    ];
    for (label, pointer, shown) in rows {
        let class = match (pointer, ready) {
            ("/ready", true) => " class=\"ready\"",
            ("/ready", false) => " class=\"notready\"",
            _ => "",
        };
        let _ = writeln!(
            out,
            "<tr{class}><th>{label}</th>{}</tr>",
            cell(status, pointer, &shown)
        );
    }
    out.push_str("</table>\n");

    out.push_str(
        "<h2>Pollers</h2>\n<table id=\"pollers\"><tr><th>poller</th><th>stream</th>\
         <th>server tag</th><th>backfill</th><th>lag</th><th>last success</th>\
         <th>open windows</th><th>last sweep</th><th>last error</th></tr>\n",
    );
    let empty = Vec::new();
    let pollers = status
        .get("pollers")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, poller) in pollers.iter().enumerate() {
        let at = |field: &str| format!("/pollers/{i}/{field}");
        let progress = poller
            .get("backfillProgress")
            .and_then(Value::as_f64)
            .map_or("–".to_owned(), |p| format!("{:.1} %", p * 100.0));
        let lag = poller
            .get("lagSeconds")
            .and_then(Value::as_f64)
            .map_or("not read yet".to_owned(), human_seconds);
        let cursors = poller
            .get("cursors")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        let mut open = String::new();
        let mut sweeps = String::new();
        for (j, cursor) in cursors.iter().enumerate() {
            let scope = escape(&text_of(cursor.get("scope")));
            let windows = cursor
                .get("openWindows")
                .and_then(Value::as_array)
                .unwrap_or(&empty);
            for window in windows {
                let _ = write!(
                    open,
                    "{scope} {} ({} missing: {})<br>",
                    escape(&text_of(window.get("day"))),
                    escape(&text_of(window.get("missing"))),
                    escape(&text_of(window.get("reason")))
                );
            }
            let _ = write!(
                sweeps,
                "{scope}: <span data-status=\"/pollers/{i}/cursors/{j}/lastSweep\" data-value=\"{}\">{}</span><br>",
                escape(&cursor.get("lastSweep").cloned().unwrap_or(Value::Null).to_string()),
                escape(&text_of(cursor.get("lastSweep")))
            );
        }
        let open_count: usize = cursors
            .iter()
            .filter_map(|c| c.get("openWindows").and_then(Value::as_array))
            .map(Vec::len)
            .sum();
        let error = match poller.get("lastError") {
            Some(Value::Object(e)) => format!(
                "<span class=\"error\">{}</span> <small>{}</small>",
                escape(&text_of(e.get("message"))),
                escape(&text_of(e.get("at")))
            ),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td><td>{}</td>{}{}{}<td>{}{}</td><td>{}</td><td class=\"last-error\">{}</td></tr>",
            escape(&text_of(poller.get("name"))),
            escape(&text_of(poller.get("stream"))),
            escape(&text_of(poller.get("serverTag"))),
            cell(status, &at("backfillProgress"), &progress),
            cell(status, &at("lagSeconds"), &lag),
            cell(status, &at("lastSuccess"), &text_of(poller.get("lastSuccess"))),
            if open_count == 0 { "0" } else { "" },
            open,
            sweeps,
            error,
        );
    }
    out.push_str("</table>\n");

    out.push_str(
        "<h2>Events by stream</h2>\n<table id=\"counts\"><tr><th>stream</th><th>created</th>\
         <th>updated</th><th>unchanged</th><th>dead letters</th><th>open windows</th>\
         <th>given up</th><th>sweeps</th><th>tracked</th><th>pages</th><th>cycles</th></tr>\n",
    );
    let fields = [
        "created",
        "updated",
        "unchanged",
        "deadLetters",
        "openWindows",
        "openWindowsGivenUp",
        "reconcileSweeps",
        "tracked",
        "pages",
        "cycles",
    ];
    if let Some(counts) = status.get("counts").and_then(Value::as_object) {
        for (stream, _) in counts {
            let _ = write!(out, "<tr><th>{}</th>", escape(stream));
            for field in fields {
                let pointer = format!("/counts/{}/{field}", pointer_token(stream));
                let shown = text_of(status.pointer(&pointer));
                out.push_str(&cell(status, &pointer, &shown));
            }
            out.push_str("</tr>\n");
        }
    }
    out.push_str("</table>\n");
    let _ = write!(
        out,
        "<p><small>Reloads every {REFRESH_SECS} s. The same figures as JSON: \
         <a href=\"/status\">/status</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/health/ready\">/health/ready</a></small></p>\n</body></html>\n"
    );
    out
}

/// Escapes a JSON pointer token (RFC 6901).
fn pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_text_is_escaped() {
        let status = json!({
            "instanceId": "<b>i</b>",
            "ready": false,
            "notReadyReason": "the CRM does not answer: <script>alert(1)</script>",
            "pollers": [{"name": "leads", "stream": "leads", "serverTag": null,
                "backfillProgress": 0.5, "lagSeconds": null, "lastSuccess": null,
                "lastError": {"at": "2026-01-01T00:00:00.000Z", "message": "x\" onmouseover=\"y <img>"},
                "cursors": [{"scope": "leads/registration", "lastSweep": null,
                    "openWindows": [{"day": "2026-01-01", "missing": 2, "reason": "<i>"}]}]}],
            "counts": {"leads": {"created": 3}},
        });
        let page = render(&status);
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img>"));
        assert!(!page.contains("<i>"));
        assert!(!page.contains("<b>i"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("x&quot; onmouseover=&quot;y &lt;img&gt;"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(page.contains("50.0 %"));
        assert!(page.contains("not read yet"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_seconds(42.4), "42 s");
        assert_eq!(human_seconds(600.0), "10 min");
        assert_eq!(human_seconds(2_404_183.0), "27.8 days");
    }
}
