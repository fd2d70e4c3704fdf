//! Models of the CRM's records, read tolerantly (docs/crm-api.md, "Tolerance").
//!
//! Every documented field is optional. Numbers may come as JSON numbers or strings; money and
//! quantities are parsed exactly into [`Decimal`] (serde_json runs with `arbitrary_precision`,
//! so a JSON number's digits never pass through `f64`). Empty strings count as missing for
//! numbers and booleans. Fields the model does not know are kept in `extra` (nested unknowns
//! of `utmDetails` under `utmDetails.<name>`), so nothing the CRM sends is dropped. A field of
//! the wrong shape fails only its record, with the field named.
//!
//! A date field that holds "no date" (a blank string, a zero date such as `0000-00-00
//! 00:00:00`, an instant Avro readers cannot represent; see [`super::time`]) is `None` and its
//! raw value is kept in `extra` under the field's own name (`extra["ftdDate"] =
//! "\"0000-00-00 00:00:00\""`): a known field never reaches `extra` otherwise, so the name
//! cannot collide with a CRM field, and a consumer that finds the field null finds what the
//! CRM wrote under the same name. [`CrmRecord::no_dates`] counts them.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::raw::Field;
use super::raw::Fields;
use super::time::{kind_of, parse_timestamp, Stamp};

/// Fields of a record that its model does not know, by name, as received; and the raw values
/// of date fields that held "no date", under the field's name (see the module's doc).
pub type Extra = BTreeMap<String, Value>;

/// The CRM endpoints ibstream reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/ib/leads`.
    Leads,
    /// `/ib/registrations` (customers, i.e. converted leads).
    Customers,
    /// `/ib/transactions`.
    Transactions,
    /// `/ib/servers`.
    Servers,
    /// `/ib/positions` (closed positions, per server tag).
    Positions,
}

impl Endpoint {
    /// Every endpoint, in the order streams are listed.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Leads,
        Endpoint::Customers,
        Endpoint::Transactions,
        Endpoint::Servers,
        Endpoint::Positions,
    ];

    /// Returns the last path segment of the endpoint (`/api/v1/<api_path>/<segment>`).
    pub fn path_segment(self) -> &'static str {
        match self {
            Endpoint::Leads => "leads",
            Endpoint::Customers => "registrations",
            Endpoint::Transactions => "transactions",
            Endpoint::Servers => "servers",
            Endpoint::Positions => "positions",
        }
    }

    /// Returns the stream name used in topics, metrics and logs.
    pub fn stream(self) -> &'static str {
        match self {
            Endpoint::Leads => "leads",
            Endpoint::Customers => "customers",
            Endpoint::Transactions => "transactions",
            Endpoint::Servers => "servers",
            Endpoint::Positions => "positions",
        }
    }

    /// Returns the CRM module the endpoint depends on (besides the IB Reports permission).
    pub fn module(self) -> &'static str {
        match self {
            Endpoint::Leads | Endpoint::Customers => "leads",
            Endpoint::Transactions => "transactions",
            Endpoint::Servers | Endpoint::Positions => "platforms",
        }
    }
}

/// A model the client can read from one JSON object of a CRM answer.
pub trait CrmRecord: Sized + Send + 'static {
    /// The endpoint that serves this record.
    const ENDPOINT: Endpoint;

    /// The record's date fields (read by [`super::time::parse_timestamp`]).
    const DATE_FIELDS: &'static [&'static str] = &[];

    /// Reads the model from a record's fields; the error names the field at fault.
    fn from_fields(fields: &Fields<'_>, tz: Tz) -> Result<Self, String>;

    /// Reads the model from a record object (tests, tools: the pipeline reads [`Fields`]).
    fn from_json(map: &Map<String, Value>, tz: Tz) -> Result<Self, String> {
        let text = Value::Object(map.clone()).to_string();
        let fields = Fields::parse(&text).map_err(|e| e.to_string())?;
        Self::from_fields(&fields, tz)
    }

    /// Returns the entity id, if the record carries one.
    fn id(&self) -> Option<String>;

    /// Returns how many of the record's date fields held "no date" (each `None` in the model,
    /// its raw value in `extra` under the field's name).
    fn no_dates(&self) -> usize {
        0
    }

    /// Returns the reason the record's trading-account list (customers' `userAdditionalId`)
    /// could not be read, if it could not: the text is kept, the accounts are empty.
    fn unreadable_accounts(&self) -> Option<String> {
        None
    }
}

/// Counts the date fields among `fields` whose raw "no date" value `extra` keeps.
fn kept_dates(extra: &Extra, fields: &[&str]) -> usize {
    fields.iter().filter(|f| extra.contains_key(**f)).count()
}

/// Date fields of leads and customers.
const PERSON_DATES: [&str; 2] = ["registrationDate", "lastModifiedDate"];

/// A tag category with the tags assigned from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagCategory {
    /// Category name; `None` for the flat tag lists of older CRM versions.
    pub category: Option<String>,
    /// Tags assigned from this category.
    pub tags: Vec<String>,
}

/// UTM attribution of a lead or customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UtmDetails {
    /// `utm_source`.
    pub utm_source: Option<String>,
    /// `utm_medium`.
    pub utm_medium: Option<String>,
    /// `utm_campaign`.
    pub utm_campaign: Option<String>,
    /// `utm_content`.
    pub utm_content: Option<String>,
    /// `utm_term`.
    pub utm_term: Option<String>,
}

/// The person fields leads and customers share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Person {
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number.
    pub phone: Option<String>,
    /// Country code.
    pub country: Option<String>,
    /// Language code.
    pub language: Option<String>,
    /// Sales status.
    pub status: Option<String>,
    /// Affiliate (IB) id that brought the person.
    pub affiliate_id: Option<String>,
    /// Marketing campaign.
    pub campaign: Option<String>,
    /// When the person registered.
    pub registration_date: Option<DateTime<Utc>>,
    /// When the record last changed.
    pub last_modified_date: Option<DateTime<Utc>>,
    /// UTM attribution.
    pub utm_details: Option<UtmDetails>,
    /// Categorized tags.
    pub tags: Option<Vec<TagCategory>>,
}

/// A lead (`/ib/leads`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lead {
    /// Lead id, the entity key.
    pub id: Option<i64>,
    /// The person fields.
    pub person: Person,
    /// Unknown fields.
    pub extra: Extra,
}

/// A customer, i.e. a converted lead (`/ib/registrations`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Customer {
    /// Customer id, the entity key.
    pub customer_id: Option<i64>,
    /// The `id` field, if the CRM sends one besides `customerId`.
    pub id: Option<i64>,
    /// Id of the lead this customer was converted from.
    pub lead_id: Option<i64>,
    /// The person fields.
    pub person: Person,
    /// When the lead became a customer.
    pub conversion_date: Option<DateTime<Utc>>,
    /// The raw "User additional ID" string.
    pub user_additional_id: Option<String>,
    /// Live trading accounts parsed from `user_additional_id`; empty when that is no readable
    /// account list (see [`CrmRecord::unreadable_accounts`]).
    pub accounts: Vec<TradingAccount>,
    /// First deposit time.
    pub ftd_date: Option<DateTime<Utc>>,
    /// Balance in USD (volatile).
    pub balance_usd: Option<Decimal>,
    /// Unknown fields.
    pub extra: Extra,
}

/// A trading account of a customer: `(login, server, type)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradingAccount {
    /// Login id on the platform server.
    pub login: String,
    /// Platform server id (a server tag).
    pub server: String,
    /// Account type (`live` / `demo`), when given.
    pub account_type: Option<String>,
}

/// A successful (or, with `includeFake`, fake) money transaction (`/ib/transactions`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transaction {
    /// Transaction id, the entity key.
    pub id: Option<i64>,
    /// Customer the transaction belongs to.
    pub customer_id: Option<i64>,
    /// `Deposit`, `Withdrawal`, …
    pub transaction_type: Option<String>,
    /// Amount in `currency`.
    pub amount: Option<Decimal>,
    /// Currency code.
    pub currency: Option<String>,
    /// Amount in USD.
    pub amount_usd: Option<Decimal>,
    /// When the transaction happened.
    pub transaction_date: Option<DateTime<Utc>>,
    /// Payment method.
    pub payment_method: Option<String>,
    /// Trading account login.
    pub trading_account: Option<String>,
    /// Server tag of the trading account.
    pub server_tag: Option<String>,
    /// Trade-related id, or the literal `N/A`.
    pub product_id: Option<String>,
    /// Whether the transaction is fake.
    pub is_fake: Option<bool>,
    /// Unknown fields.
    pub extra: Extra,
}

/// A platform server (`/ib/servers`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Server {
    /// Platform group the server was listed under (`mt4`, `mt5`, …).
    pub platform: Option<String>,
    /// Server id, the server tag used by `/ib/positions`.
    pub id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// `live` or `demo`.
    pub server_type: Option<String>,
    /// Unknown fields.
    pub extra: Extra,
}

impl Server {
    /// Returns whether this is a live server (whose positions are streamed).
    pub fn is_live(&self) -> bool {
        self.server_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("live"))
    }
}

/// A closed trading position (`/ib/positions`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Position {
    /// Position id, unique per server.
    pub position_id: Option<i64>,
    /// Trading account login.
    pub login: Option<String>,
    /// Server tag.
    pub server_tag: Option<String>,
    /// Customer owning the account.
    pub customer_id: Option<i64>,
    /// Instrument.
    pub symbol: Option<String>,
    /// `Buy` / `Sell`.
    pub side: Option<String>,
    /// Volume in lots.
    pub volume: Option<Decimal>,
    /// Open price.
    pub open_price: Option<Decimal>,
    /// Close price.
    pub close_price: Option<Decimal>,
    /// Open time.
    pub open_time: Option<DateTime<Utc>>,
    /// Close time.
    pub close_time: Option<DateTime<Utc>>,
    /// Profit.
    pub profit: Option<Decimal>,
    /// Commission.
    pub commission: Option<Decimal>,
    /// Swap.
    pub swap: Option<Decimal>,
    /// Currency of profit, commission and swap.
    pub currency: Option<String>,
    /// Unknown fields.
    pub extra: Extra,
}

/// Field readers: each takes the key (for the error) and the value; `null` reads as `None`.
/// Models walk their record once and `match` on the key, so a record costs one pass and
/// unknown keys fall through to `extra`.
fn string(key: &str, value: &Field<'_>) -> Result<Option<String>, String> {
    match value {
        Field::Null => Ok(None),
        v => lenient_string(v)
            .map(Some)
            .map_err(|e| field_error(key, &e)),
    }
}

fn int(key: &str, value: &Field<'_>) -> Result<Option<i64>, String> {
    lenient_int(value).map_err(|e| field_error(key, &e))
}

fn decimal(key: &str, value: &Field<'_>) -> Result<Option<Decimal>, String> {
    lenient_decimal(value).map_err(|e| field_error(key, &e))
}

/// Reads a date field; "no date" is `None` with the raw value kept in `extra` under `key`.
fn timestamp(
    key: &str,
    value: &Field<'_>,
    tz: Tz,
    extra: &mut Extra,
) -> Result<Option<DateTime<Utc>>, String> {
    match parse_timestamp(value, tz).map_err(|e| field_error(key, &e))? {
        Stamp::At(t) => Ok(Some(t)),
        Stamp::Null => Ok(None),
        Stamp::NoDate(_) => {
            keep(extra, key, value);
            Ok(None)
        }
    }
}

fn boolean(key: &str, value: &Field<'_>) -> Result<Option<bool>, String> {
    match value {
        Field::Null => Ok(None),
        Field::Bool(b) => Ok(Some(*b)),
        v => match lenient_string(v).map_err(|e| field_error(key, &e))?.trim() {
            "" => Ok(None),
            "true" | "True" | "TRUE" | "1" => Ok(Some(true)),
            "false" | "False" | "FALSE" | "0" => Ok(Some(false)),
            other => Err(field_error(key, &format!("not a boolean: {other:?}"))),
        },
    }
}

impl Person {
    /// Reads `key` into the person if it is a person field; returns whether it was.
    fn read(
        &mut self,
        key: &str,
        value: &Field<'_>,
        tz: Tz,
        extra: &mut Extra,
    ) -> Result<bool, String> {
        match key {
            "firstName" => self.first_name = string(key, value)?,
            "lastName" => self.last_name = string(key, value)?,
            "email" => self.email = string(key, value)?,
            "phone" => self.phone = string(key, value)?,
            "country" => self.country = string(key, value)?,
            "language" => self.language = string(key, value)?,
            "status" => self.status = string(key, value)?,
            "affiliateId" => self.affiliate_id = string(key, value)?,
            "campaign" => self.campaign = string(key, value)?,
            "registrationDate" => self.registration_date = timestamp(key, value, tz, extra)?,
            "lastModifiedDate" => self.last_modified_date = timestamp(key, value, tz, extra)?,
            "utmDetails" if !value.is_null() => {
                self.utm_details = Some(utm_details(&value.to_value(), extra)?)
            }
            "tags" if !value.is_null() => self.tags = Some(tag_categories(&value.to_value())?),
            "utmDetails" | "tags" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn keep(extra: &mut Extra, key: &str, value: &Field<'_>) {
    extra.insert(key.to_owned(), value.to_value());
}

fn field_error(key: &str, reason: &str) -> String {
    format!("field `{key}`: {reason}")
}

fn lenient_string(value: &Field<'_>) -> Result<String, String> {
    match value {
        Field::String(s) => Ok(s.to_string()),
        Field::Number(n) => Ok((*n).to_owned()),
        Field::Bool(b) => Ok(b.to_string()),
        other => Err(format!("expected a string, got {}", other.kind())),
    }
}

/// [`lenient_string`] of a value inside a nested object or array.
fn lenient_string_json(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("expected a string, got {}", kind_of(other))),
    }
}

fn lenient_int(value: &Field<'_>) -> Result<Option<i64>, String> {
    match value {
        Field::Null => Ok(None),
        Field::Number(n) => n
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("not a 64-bit integer: {n}")),
        Field::String(s) if s.trim().is_empty() => Ok(None),
        Field::String(s) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("not an integer: {s:?}")),
        other => Err(format!("expected an integer, got {}", other.kind())),
    }
}

/// Parses a decimal exactly from a JSON number's digits or a string.
pub fn lenient_decimal(value: &Field<'_>) -> Result<Option<Decimal>, String> {
    let text = match value {
        Field::Null => return Ok(None),
        Field::Number(n) => n,
        Field::String(s) if s.trim().is_empty() => return Ok(None),
        Field::String(s) => s.trim(),
        other => return Err(format!("expected a decimal, got {}", other.kind())),
    };
    parse_decimal(text).map(Some)
}

/// Parses decimal text exactly: plain (`-12.50`) or scientific (`1.5e-3`); never rounds.
pub fn parse_decimal(text: &str) -> Result<Decimal, String> {
    // rust_decimal also takes `1_000`; money text with anything but these is not a number.
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
    {
        return Err(format!("not a decimal: {text:?}"));
    }
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str_exact(text)
    };
    parsed.map_err(|e| format!("not an exact decimal: {text:?} ({e})"))
}

fn utm_details(value: &Value, extra: &mut Extra) -> Result<UtmDetails, String> {
    const KNOWN: [&str; 5] = [
        "utmSource",
        "utmMedium",
        "utmCampaign",
        "utmContent",
        "utmTerm",
    ];
    let Value::Object(map) = value else {
        return Err(field_error(
            "utmDetails",
            &format!("expected an object, got {}", kind_of(value)),
        ));
    };
    let get = |key: &str| -> Result<Option<String>, String> {
        map.get(key)
            .filter(|v| !v.is_null())
            .map(|v| {
                lenient_string_json(v).map_err(|e| field_error(&format!("utmDetails.{key}"), &e))
            })
            .transpose()
    };
    for (k, v) in map.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
        extra.insert(format!("utmDetails.{k}"), v.clone());
    }
    Ok(UtmDetails {
        utm_source: get("utmSource")?,
        utm_medium: get("utmMedium")?,
        utm_campaign: get("utmCampaign")?,
        utm_content: get("utmContent")?,
        utm_term: get("utmTerm")?,
    })
}

fn tag_categories(value: &Value) -> Result<Vec<TagCategory>, String> {
    let Value::Array(items) = value else {
        return Err(field_error(
            "tags",
            &format!("expected an array, got {}", kind_of(value)),
        ));
    };
    let mut flat = Vec::new();
    let mut categories = Vec::new();
    for item in items {
        match item {
            // Older CRM versions send a flat list of tag names.
            Value::String(tag) => flat.push(tag.clone()),
            Value::Object(map) => {
                let category = map
                    .get("category")
                    .or_else(|| map.get("name"))
                    .filter(|v| !v.is_null())
                    .map(lenient_string_json)
                    .transpose()
                    .map_err(|e| field_error("tags.category", &e))?;
                let tags = match map.get("tags") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(tags)) => tags
                        .iter()
                        .map(lenient_string_json)
                        .collect::<Result<_, _>>()
                        .map_err(|e| field_error("tags.tags", &e))?,
                    Some(other) => {
                        return Err(field_error(
                            "tags.tags",
                            &format!("expected an array, got {}", kind_of(other)),
                        ))
                    }
                };
                categories.push(TagCategory { category, tags });
            }
            other => {
                return Err(field_error(
                    "tags",
                    &format!("unexpected element: {}", kind_of(other)),
                ))
            }
        }
    }
    if !flat.is_empty() {
        categories.push(TagCategory {
            category: None,
            tags: flat,
        });
    }
    Ok(categories)
}

/// Parses "User additional ID": `(login, server, type)` groups separated by `,` or `;`,
/// with or without parentheses, or `login:server[:type]` groups separated by `,` or `;`
/// (`123:Server1,456:Server2`). Empty text is no accounts. The accounts are a set: their order
/// carries nothing (fingerprints ignore it).
///
/// The `(login, server, type)` readings come first, as in releases before the colon form: a
/// server or type may hold a colon (`12345, mt4.broker.com:443, live`), and text they read is
/// read as they read it, so no list read before reads differently now (its fingerprint and
/// event stay what they were). The colon form is taken only when they fail and every group
/// splits into 2–3 colon parts with a login and a server.
pub fn parse_accounts(text: &str) -> Result<Vec<TradingAccount>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    match triple_groups(text).and_then(accounts_of) {
        Ok(accounts) => Ok(accounts),
        Err(e) => colon_groups(text).map_or(Err(e), accounts_of),
    }
}

/// Splits text into `(login, server, type)` groups: parenthesized, `;`-separated, or a flat
/// comma list of triples.
fn triple_groups(text: &str) -> Result<Vec<Vec<&str>>, String> {
    Ok(if text.contains('(') {
        let mut groups = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('(') {
            let between =
                rest[..open].trim_matches(|c: char| c == ',' || c == ';' || c.is_whitespace());
            if !between.is_empty() {
                return Err(format!("unexpected text {between:?} between accounts"));
            }
            let close = rest[open..]
                .find(')')
                .ok_or_else(|| "unbalanced parenthesis".to_owned())?
                + open;
            groups.push(split_parts(&rest[open + 1..close]));
            rest = &rest[close + 1..];
        }
        let tail = rest.trim_matches(|c: char| c == ',' || c == ';' || c.is_whitespace());
        if !tail.is_empty() {
            return Err(format!("unexpected text {tail:?} after accounts"));
        }
        groups
    } else if text.contains(';') {
        text.split(';')
            .filter(|g| !g.trim().is_empty())
            .map(split_parts)
            .collect()
    } else {
        let parts = split_parts(text);
        if parts.len() % 3 != 0 {
            return Err(format!(
                "expected (login, server, type) triples, got {} values",
                parts.len()
            ));
        }
        parts.chunks(3).map(<[&str]>::to_vec).collect()
    })
}

/// Splits text into `login:server[:type]` groups separated by `,` or `;`, if every group is
/// one (2–3 colon parts, login and server not blank).
fn colon_groups(text: &str) -> Option<Vec<Vec<&str>>> {
    let groups: Vec<Vec<&str>> = text
        .split([',', ';'])
        .filter(|g| !g.trim().is_empty())
        .map(|g| g.split(':').map(str::trim).collect())
        .collect();
    let clean = |parts: &Vec<&str>| {
        (2..=3).contains(&parts.len()) && !parts[0].is_empty() && !parts[1].is_empty()
    };
    (text.contains(':') && groups.iter().all(clean)).then_some(groups)
}

/// Reads `(login, server[, type])` groups as accounts.
fn accounts_of(groups: Vec<Vec<&str>>) -> Result<Vec<TradingAccount>, String> {
    groups
        .into_iter()
        .map(|parts| match parts.as_slice() {
            [login, server] if !login.is_empty() && !server.is_empty() => Ok(TradingAccount {
                login: (*login).to_owned(),
                server: (*server).to_owned(),
                account_type: None,
            }),
            [login, server, kind] if !login.is_empty() && !server.is_empty() => {
                Ok(TradingAccount {
                    login: (*login).to_owned(),
                    server: (*server).to_owned(),
                    account_type: (!kind.is_empty()).then(|| (*kind).to_owned()),
                })
            }
            _ => Err(format!("unreadable account {:?}", parts.join(", "))),
        })
        .collect()
}

fn split_parts(group: &str) -> Vec<&str> {
    group.split(',').map(str::trim).collect()
}

impl CrmRecord for Lead {
    const ENDPOINT: Endpoint = Endpoint::Leads;
    const DATE_FIELDS: &'static [&'static str] = &PERSON_DATES;

    fn from_fields(map: &Fields<'_>, tz: Tz) -> Result<Self, String> {
        let mut lead = Lead::default();
        for (key, value) in map.iter() {
            match key {
                "id" => lead.id = int(key, value)?,
                k => {
                    if !lead.person.read(k, value, tz, &mut lead.extra)? {
                        keep(&mut lead.extra, k, value);
                    }
                }
            }
        }
        Ok(lead)
    }

    fn id(&self) -> Option<String> {
        self.id.map(|id| id.to_string())
    }

    fn no_dates(&self) -> usize {
        kept_dates(&self.extra, &PERSON_DATES)
    }
}

impl CrmRecord for Customer {
    const ENDPOINT: Endpoint = Endpoint::Customers;
    const DATE_FIELDS: &'static [&'static str] = &[
        "registrationDate",
        "lastModifiedDate",
        "conversionDate",
        "ftdDate",
    ];

    fn from_fields(map: &Fields<'_>, tz: Tz) -> Result<Self, String> {
        let mut c = Customer::default();
        for (key, value) in map.iter() {
            match key {
                "customerId" => c.customer_id = int(key, value)?,
                "id" => c.id = int(key, value)?,
                "leadId" => c.lead_id = int(key, value)?,
                "conversionDate" => c.conversion_date = timestamp(key, value, tz, &mut c.extra)?,
                "userAdditionalId" => {
                    c.user_additional_id = string(key, value)?;
                    // An unreadable list leaves `accounts` empty, the text kept as it is
                    // (counted and warned about by the poller: `unreadable_accounts`).
                    c.accounts = c
                        .user_additional_id
                        .as_deref()
                        .and_then(|text| parse_accounts(text).ok())
                        .unwrap_or_default();
                }
                "ftdDate" => c.ftd_date = timestamp(key, value, tz, &mut c.extra)?,
                "balanceUsd" => c.balance_usd = decimal(key, value)?,
                k => {
                    if !c.person.read(k, value, tz, &mut c.extra)? {
                        keep(&mut c.extra, k, value);
                    }
                }
            }
        }
        Ok(c)
    }

    fn id(&self) -> Option<String> {
        self.customer_id.map(|id| id.to_string())
    }

    fn no_dates(&self) -> usize {
        kept_dates(&self.extra, &PERSON_DATES)
            + kept_dates(&self.extra, &["conversionDate", "ftdDate"])
    }

    fn unreadable_accounts(&self) -> Option<String> {
        parse_accounts(self.user_additional_id.as_deref()?).err()
    }
}

impl CrmRecord for Transaction {
    const ENDPOINT: Endpoint = Endpoint::Transactions;
    const DATE_FIELDS: &'static [&'static str] = &["transactionDate"];

    fn from_fields(map: &Fields<'_>, tz: Tz) -> Result<Self, String> {
        let mut t = Transaction::default();
        for (key, value) in map.iter() {
            match key {
                "id" => t.id = int(key, value)?,
                "customerId" => t.customer_id = int(key, value)?,
                "type" => t.transaction_type = string(key, value)?,
                "amount" => t.amount = decimal(key, value)?,
                "currency" => t.currency = string(key, value)?,
                "amountUsd" => t.amount_usd = decimal(key, value)?,
                "transactionDate" => t.transaction_date = timestamp(key, value, tz, &mut t.extra)?,
                "paymentMethod" => t.payment_method = string(key, value)?,
                "tradingAccount" => t.trading_account = string(key, value)?,
                "serverTag" => t.server_tag = string(key, value)?,
                "productId" => t.product_id = string(key, value)?,
                "isFake" => t.is_fake = boolean(key, value)?,
                k => keep(&mut t.extra, k, value),
            }
        }
        Ok(t)
    }

    fn id(&self) -> Option<String> {
        self.id.map(|id| id.to_string())
    }

    fn no_dates(&self) -> usize {
        kept_dates(&self.extra, &["transactionDate"])
    }
}

impl CrmRecord for Server {
    const ENDPOINT: Endpoint = Endpoint::Servers;

    fn from_fields(map: &Fields<'_>, _tz: Tz) -> Result<Self, String> {
        let mut server = Server::default();
        for (key, value) in map.iter() {
            match key {
                "platform" => server.platform = string(key, value)?,
                "id" => server.id = string(key, value)?,
                "name" => server.name = string(key, value)?,
                "type" => server.server_type = string(key, value)?,
                k => keep(&mut server.extra, k, value),
            }
        }
        Ok(server)
    }

    fn id(&self) -> Option<String> {
        self.id.clone()
    }
}

impl CrmRecord for Position {
    const ENDPOINT: Endpoint = Endpoint::Positions;
    const DATE_FIELDS: &'static [&'static str] = &["openTime", "closeTime"];

    fn from_fields(map: &Fields<'_>, tz: Tz) -> Result<Self, String> {
        let mut p = Position::default();
        for (key, value) in map.iter() {
            match key {
                "positionId" => p.position_id = int(key, value)?,
                "login" => p.login = string(key, value)?,
                "serverTag" => p.server_tag = string(key, value)?,
                "customerId" => p.customer_id = int(key, value)?,
                "symbol" => p.symbol = string(key, value)?,
                "side" => p.side = string(key, value)?,
                "volume" => p.volume = decimal(key, value)?,
                "openPrice" => p.open_price = decimal(key, value)?,
                "closePrice" => p.close_price = decimal(key, value)?,
                "openTime" => p.open_time = timestamp(key, value, tz, &mut p.extra)?,
                "closeTime" => p.close_time = timestamp(key, value, tz, &mut p.extra)?,
                "profit" => p.profit = decimal(key, value)?,
                "commission" => p.commission = decimal(key, value)?,
                "swap" => p.swap = decimal(key, value)?,
                "currency" => p.currency = string(key, value)?,
                k => keep(&mut p.extra, k, value),
            }
        }
        Ok(p)
    }

    fn id(&self) -> Option<String> {
        self.position_id.map(|id| id.to_string())
    }

    fn no_dates(&self) -> usize {
        kept_dates(&self.extra, &["openTime", "closeTime"])
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.stream() == s || e.path_segment() == s)
            .ok_or_else(|| format!("unknown endpoint {s:?} (expected leads, customers, transactions, servers or positions)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn lead_reference_shape_parses_with_unknowns_kept() {
        let raw = obj(
            json!({"id": 100231, "firstName": "Maria", "lastName": "Ionescu",
            "email": "maria.i@example.org", "phone": "+40712345678", "country": "RO",
            "language": "ro", "status": "New", "affiliateId": "IB-1042", "campaign": "spring-webinar",
            "registrationDate": "2019-03-14 09:21:44", "lastModifiedDate": "2019-03-15 10:01:02",
            "utmDetails": {"utmSource": "ib-portal", "utmMedium": "referral", "utmCampaign": "spring",
                "utmContent": null, "utmTerm": null, "utmId": "x1"},
            "tags": [{"category": "Marketing", "tags": ["webinar", "vip"]}],
            "score": 7, "owner": {"name": "desk 3"}}),
        );
        let lead = Lead::from_json(&raw, Tz::UTC).unwrap();
        assert_eq!(lead.id, Some(100231));
        assert_eq!(lead.person.first_name.as_deref(), Some("Maria"));
        assert_eq!(
            lead.person
                .utm_details
                .as_ref()
                .unwrap()
                .utm_source
                .as_deref(),
            Some("ib-portal")
        );
        assert_eq!(lead.person.utm_details.as_ref().unwrap().utm_content, None);
        assert_eq!(
            lead.person.tags,
            Some(vec![TagCategory {
                category: Some("Marketing".into()),
                tags: vec!["webinar".into(), "vip".into()]
            }])
        );
        assert_eq!(lead.extra.len(), 3, "{:?}", lead.extra);
        assert_eq!(lead.extra["score"], json!(7));
        assert_eq!(lead.extra["owner"], json!({"name": "desk 3"}));
        assert_eq!(lead.extra["utmDetails.utmId"], json!("x1"));
        assert_eq!(lead.id(), Some("100231".into()));
    }

    #[test]
    fn numbers_as_strings_and_money_exact() {
        let raw: Value = serde_json::from_str(
            r#"{"id": "9000123", "customerId": 5501, "amount": 0.1, "amountUsd": "12345678901234567890.12345678",
               "isFake": "false", "transactionDate": "", "productId": 17}"#,
        )
        .unwrap();
        let t = Transaction::from_json(&obj(raw), Tz::UTC).unwrap();
        assert_eq!(t.id, Some(9000123));
        assert_eq!(t.amount.unwrap().to_string(), "0.1");
        assert_eq!(
            t.amount_usd.unwrap().to_string(),
            "12345678901234567890.12345678"
        );
        assert_eq!(t.is_fake, Some(false));
        assert_eq!(t.transaction_date, None);
        assert_eq!(t.product_id.as_deref(), Some("17"));
    }

    #[test]
    fn json_number_money_is_not_rounded_through_f64() {
        // 0.1 + 0.2 style values and long mantissas survive because the text is parsed.
        let raw: Value = serde_json::from_str(
            r#"{"positionId": 1, "profit": 1234567.12345678, "volume": 1e-2}"#,
        )
        .unwrap();
        let p = Position::from_json(&obj(raw), Tz::UTC).unwrap();
        assert_eq!(p.profit.unwrap().to_string(), "1234567.12345678");
        assert_eq!(p.volume.unwrap().to_string(), "0.01");
    }

    #[test]
    fn hostile_numbers_are_errors_not_panics() {
        for text in [
            "1e99999999999",
            "-",
            ".",
            "1e",
            "e5",
            "--1",
            "1.2.3",
            "NaN",
            "inf",
            "99999999999999999999999999999999999",
            "0x10",
            "1_000",
        ] {
            assert!(parse_decimal(text).is_err(), "{text}");
        }
        assert_eq!(parse_decimal("1.5e-3").unwrap().to_string(), "0.0015");
        assert_eq!(
            parse_decimal("-0.00000001").unwrap().to_string(),
            "-0.00000001"
        );
        let raw: Value =
            serde_json::from_str(r#"{"id": 1e400, "customerId": 18446744073709551616}"#).unwrap();
        assert!(Transaction::from_json(&obj(raw), Tz::UTC).is_err());
    }

    #[test]
    fn bad_field_names_the_field() {
        let err =
            Transaction::from_json(&obj(json!({"id": 1, "amount": "12,5x"})), Tz::UTC).unwrap_err();
        assert!(err.contains("`amount`"), "{err}");
        let err = Lead::from_json(
            &obj(json!({"id": 1, "registrationDate": "yesterday"})),
            Tz::UTC,
        )
        .unwrap_err();
        assert!(err.contains("`registrationDate`"), "{err}");
        let err = Lead::from_json(&obj(json!({"id": [1]})), Tz::UTC).unwrap_err();
        assert!(err.contains("`id`"), "{err}");
    }

    #[test]
    fn every_field_may_be_missing() {
        let lead = Lead::from_json(&Map::new(), Tz::UTC).unwrap();
        assert_eq!(lead, Lead::default());
        assert_eq!(lead.id(), None);
        let c = Customer::from_json(&Map::new(), Tz::UTC).unwrap();
        assert!(c.accounts.is_empty());
    }

    #[test]
    fn customer_accounts_parse_in_every_tolerated_form() {
        let expected = vec![
            TradingAccount {
                login: "12345".into(),
                server: "mt4-live-01".into(),
                account_type: Some("live".into()),
            },
            TradingAccount {
                login: "88112".into(),
                server: "mt5-live-02".into(),
                account_type: Some("live".into()),
            },
        ];
        for text in [
            "(12345, mt4-live-01, live), (88112, mt5-live-02, live)",
            "(12345, mt4-live-01, live); (88112, mt5-live-02, live)",
            "(12345,mt4-live-01,live)(88112,mt5-live-02,live)",
            "12345, mt4-live-01, live; 88112, mt5-live-02, live",
            "12345, mt4-live-01, live, 88112, mt5-live-02, live",
        ] {
            assert_eq!(parse_accounts(text).unwrap(), expected, "{text}");
        }
        assert_eq!(parse_accounts("").unwrap(), vec![]);
        // `login:server[:type]` groups.
        let colon = parse_accounts("12345:mt4-live-01:live, 88112 : mt5-live-02:live").unwrap();
        assert_eq!(colon, expected);
        assert_eq!(
            parse_accounts("123:Server1,456:Server2;789:Server3").unwrap(),
            vec![
                TradingAccount {
                    login: "123".into(),
                    server: "Server1".into(),
                    account_type: None
                },
                TradingAccount {
                    login: "456".into(),
                    server: "Server2".into(),
                    account_type: None
                },
                TradingAccount {
                    login: "789".into(),
                    server: "Server3".into(),
                    account_type: None
                },
            ]
        );
        assert!(parse_accounts("123:,456:Server2").is_err());
        assert!(parse_accounts("(12345, mt4").is_err());
        assert!(parse_accounts("12345, mt4").is_err());
        let c = Customer::from_json(
            &obj(json!({"customerId": 5501, "leadId": "100231", "userAdditionalId": "(12345, mt4-live-01, live)", "balanceUsd": "1520.40"})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(c.id(), Some("5501".into()));
        assert_eq!(c.lead_id, Some(100231));
        assert_eq!(c.accounts.len(), 1);
        assert_eq!(c.balance_usd.unwrap().to_string(), "1520.40");
    }

    #[test]
    fn account_lists_with_a_colon_read_as_before_the_colon_form() {
        let acct = |login: &str, server: &str, kind: &str| TradingAccount {
            login: login.into(),
            server: server.into(),
            account_type: Some(kind.into()),
        };
        // A colon inside a server or type: the (login, server, type) readings, as before.
        assert_eq!(
            parse_accounts("12345, mt4.broker.com:443, live").unwrap(),
            vec![acct("12345", "mt4.broker.com:443", "live")]
        );
        assert_eq!(
            parse_accounts("12345, Live:Pro, real; 88112, mt5-live-02, live").unwrap(),
            vec![
                acct("12345", "Live:Pro", "real"),
                acct("88112", "mt5-live-02", "live")
            ]
        );
        assert_eq!(
            parse_accounts("(12345, a:b, live), (7, c, d:e)").unwrap(),
            vec![acct("12345", "a:b", "live"), acct("7", "c", "d:e")]
        );
        // Text no reading accepts: an error naming the first reading's complaint.
        assert!(parse_accounts("12345, mt4:443").is_err());
        assert!(parse_accounts("1:2:3:4").is_err());
    }

    #[test]
    fn an_unreadable_account_list_leaves_the_customer_readable() {
        for text in ["12345, mt4", "(12345, mt4", "12345:, 7", "1:2:3:4; 5"] {
            let c = Customer::from_json(
                &obj(json!({"customerId": 5501, "userAdditionalId": text,
                    "ftdDate": "2026-11-02 10:00:00"})),
                Tz::UTC,
            )
            .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(c.user_additional_id.as_deref(), Some(text));
            assert!(c.accounts.is_empty(), "{text:?}");
            assert!(c.ftd_date.is_some());
            assert!(c.unreadable_accounts().is_some(), "{text:?}");
        }
        let c = Customer::from_json(
            &obj(json!({"customerId": 1, "userAdditionalId": "(12345, mt4-live-01, live)"})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(c.unreadable_accounts(), None);
        let c = Customer::from_json(&obj(json!({"customerId": 1})), Tz::UTC).unwrap();
        assert_eq!(c.unreadable_accounts(), None);
    }

    #[test]
    fn flat_tag_lists_are_tolerated() {
        let lead = Lead::from_json(&obj(json!({"tags": ["vip", "webinar"]})), Tz::UTC).unwrap();
        assert_eq!(
            lead.person.tags.unwrap(),
            vec![TagCategory {
                category: None,
                tags: vec!["vip".into(), "webinar".into()]
            }]
        );
    }

    #[test]
    fn no_date_fields_are_null_with_their_raw_value_in_extra() {
        let c = Customer::from_json(
            &obj(json!({"customerId": 5501, "ftdDate": "0000-00-00 00:00:00",
                "conversionDate": "0000-00-00", "lastModifiedDate": "2026-11-00 09:00:00",
                "registrationDate": "2019-03-14 09:21:44"})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(c.ftd_date, None);
        assert_eq!(c.conversion_date, None);
        assert_eq!(c.person.last_modified_date, None);
        assert!(c.person.registration_date.is_some());
        assert_eq!(c.extra["ftdDate"], json!("0000-00-00 00:00:00"));
        assert_eq!(c.extra["conversionDate"], json!("0000-00-00"));
        assert_eq!(c.extra["lastModifiedDate"], json!("2026-11-00 09:00:00"));
        assert_eq!(c.extra.len(), 3);
        assert_eq!(c.no_dates(), 3);
        // A blank date and the epoch zero are "no date" too; `null` is just null.
        let t =
            Transaction::from_json(&obj(json!({"id": 1, "transactionDate": ""})), Tz::UTC).unwrap();
        assert_eq!((t.transaction_date, t.no_dates()), (None, 1));
        assert_eq!(t.extra["transactionDate"], json!(""));
        let p = Position::from_json(
            &obj(json!({"positionId": 1, "openTime": 0, "closeTime": null})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!((p.open_time, p.close_time, p.no_dates()), (None, None, 1));
        assert_eq!(p.extra["openTime"], json!(0));
        // East of UTC, year 1 becomes year 0: not representable, so no date.
        let lead = Lead::from_json(
            &obj(json!({"id": 1, "registrationDate": "0001-01-01 00:00:00"})),
            "Asia/Tokyo".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(lead.person.registration_date, None);
        assert_eq!(lead.no_dates(), 1);
        // A date that is no date at all still fails its record, naming the field.
        let err = Customer::from_json(
            &obj(json!({"customerId": 1, "ftdDate": "2019-02-30"})),
            Tz::UTC,
        )
        .unwrap_err();
        assert!(err.contains("`ftdDate`"), "{err}");
    }

    #[test]
    fn epoch_seconds_are_seconds() {
        let t = Transaction::from_json(
            &obj(json!({"id": 1, "transactionDate": 1764500000})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(
            t.transaction_date.unwrap().to_rfc3339(),
            "2025-11-30T10:53:20+00:00"
        );
        assert_eq!(t.no_dates(), 0);
    }
}
