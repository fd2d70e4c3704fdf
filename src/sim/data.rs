//! The simulator's records: deterministic generation, queries, changes, and rendering in the
//! payload shapes of docs/crm-api.md.
//!
//! Records are held as compact structs (timestamps as epoch seconds, money as integer minor
//! units) and rendered to JSON only when served, so memory stays proportional to the record
//! count. The vectors are in id order and records are only appended, so plain pages are stable.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::crm::time::{format_local, local_to_utc};

const FIRST_NAMES: [&str; 24] = [
    "Maria", "Andreas", "Elena", "Giorgos", "Sofia", "Nikos", "Anna", "Ivan", "Olga", "Ahmed",
    "Fatima", "Lukas", "Emma", "Mateo", "Chloe", "Kenji", "Aiko", "Rahul", "Priya", "Omar", "Lina",
    "Pavel", "Ines", "Tomás",
];
const LAST_NAMES: [&str; 24] = [
    "Ionescu",
    "Papadopoulos",
    "Georgiou",
    "Ivanova",
    "Petrov",
    "Hassan",
    "Müller",
    "Schmidt",
    "García",
    "Rossi",
    "Dubois",
    "Tanaka",
    "Sato",
    "Sharma",
    "Patel",
    "Nowak",
    "Kowalski",
    "Silva",
    "Costa",
    "Novak",
    "Horvat",
    "Yilmaz",
    "Haddad",
    "O'Brien",
];
const COUNTRIES: [(&str, &str); 12] = [
    ("RO", "ro"),
    ("CY", "el"),
    ("GR", "el"),
    ("DE", "de"),
    ("ES", "es"),
    ("IT", "it"),
    ("FR", "fr"),
    ("PL", "pl"),
    ("AE", "ar"),
    ("JP", "ja"),
    ("IN", "en"),
    ("GB", "en"),
];
const LEAD_STATUSES: [&str; 6] = [
    "New",
    "No Answer",
    "Call Back",
    "Interested",
    "Not Interested",
    "Wrong Number",
];
const CUSTOMER_STATUSES: [&str; 4] = ["Active", "Dormant", "VIP", "Under Review"];
const CAMPAIGNS: [&str; 6] = [
    "spring-webinar",
    "summer-promo",
    "gold-rush",
    "crypto-week",
    "ib-referral",
    "seo-organic",
];
const UTM_SOURCES: [&str; 5] = [
    "ib-portal",
    "google",
    "facebook",
    "newsletter",
    "partner-site",
];
const UTM_MEDIUMS: [&str; 4] = ["referral", "cpc", "email", "social"];
const TAGS: [(&str, [&str; 3]); 3] = [
    ("Marketing", ["webinar", "vip", "newsletter"]),
    ("Risk", ["high-risk", "pep", "kyc-pending"]),
    ("Sales", ["hot", "cold", "callback"]),
];
const PAYMENT_METHODS: [&str; 5] = ["CreditCard", "WireTransfer", "Skrill", "Neteller", "Crypto"];
const SYMBOLS: [(&str, i64); 8] = [
    ("EURUSD", 108_123),
    ("GBPUSD", 126_540),
    ("USDJPY", 14_985_000),
    ("XAUUSD", 203_450_000),
    ("AUDUSD", 65_870),
    ("USDCHF", 88_210),
    ("BTCUSD", 4_215_000_000),
    ("US30", 3_812_500_000),
];

/// A money or quantity value as the API serves it: a JSON string by default, a JSON number
/// with `--numeric-money`, written with an exponent once `reformat`ted (the same number).
struct Money {
    text: String,
    form: MoneyForm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoneyForm {
    Text,
    Number,
    Exponent,
}

impl serde::Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = match self.form {
            MoneyForm::Text => return serializer.serialize_str(&self.text),
            MoneyForm::Number => self.text.clone(),
            MoneyForm::Exponent => {
                // "-12.50" → "-1250e-2": the same number written another way.
                let (int, frac) = self.text.split_once('.').unwrap_or((&self.text, ""));
                format!("{int}{frac}e-{}", frac.len())
            }
        };
        match text.parse::<serde_json::Number>() {
            Ok(number) => number.serialize(serializer),
            Err(_) => serializer.serialize_str(&text),
        }
    }
}

/// A transaction as the API serves it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TransactionWire<'a> {
    id: i64,
    customer_id: Option<i64>,
    #[serde(rename = "type")]
    kind: &'static str,
    amount: Money,
    currency: &'static str,
    amount_usd: Money,
    transaction_date: Option<WireDate>,
    payment_method: &'static str,
    trading_account: Option<String>,
    server_tag: Option<&'a str>,
    product_id: String,
    is_fake: bool,
}

/// A date as the API serves it: local text, or epoch seconds with `--epoch-seconds`.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum WireDate {
    Text(String),
    Seconds(i64),
}

/// A closed position as the API serves it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PositionWire<'a> {
    position_id: i64,
    login: String,
    server_tag: &'a str,
    customer_id: Option<i64>,
    symbol: &'static str,
    side: &'static str,
    volume: Money,
    open_price: Money,
    close_price: Money,
    open_time: String,
    close_time: String,
    profit: Money,
    commission: Money,
    swap: Money,
    currency: &'static str,
}

/// An entity kind of the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Leads.
    Leads,
    /// Customers (registrations).
    Customers,
    /// Transactions.
    Transactions,
    /// Servers.
    Servers,
    /// Closed positions.
    Positions,
}

impl Kind {
    /// Parses a kind from its endpoint segment or stream name.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "leads" => Kind::Leads,
            "customers" | "registrations" => Kind::Customers,
            "transactions" => Kind::Transactions,
            "servers" => Kind::Servers,
            "positions" => Kind::Positions,
            _ => return None,
        })
    }
}

/// One change made by [`SimData::mutate`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// Stream of the changed entity (`leads`, `customers`, …).
    pub stream: &'static str,
    /// `created` or `updated`.
    pub op: &'static str,
    /// Entity key as the stream keys it (positions: `serverTag:positionId`).
    pub key: String,
}

/// A kind of change [`SimData::mutate`] can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new lead registers.
    NewLead,
    /// A lead's status or phone changes.
    EditLead,
    /// A lead converts to a customer.
    Conversion,
    /// A customer's status, phone or balance changes.
    EditCustomer,
    /// A deposit or withdrawal (a customer's first deposit also sets its `ftdDate`).
    Transaction,
    /// A successful transaction dated `days` ago, booked now (a deposit that succeeded late).
    LateTransaction {
        /// How many days before now it is dated.
        days: u32,
    },
    /// One transaction's amount and one closed position's profit change (by 1.00), the
    /// records dated closest to `days` ago (random records without `days`).
    Correction {
        /// How many days back the corrected records are dated.
        days: Option<u32>,
    },
    /// The last correction is undone (its records are as they were before it).
    Revert,
    /// One transaction becomes unreadable (its amount malformed, as `--malformed-rate`
    /// makes them): the one dated closest to `days` ago, a random one without `days`.
    Malform {
        /// How many days back the transaction is dated.
        days: Option<u32>,
    },
    /// One transaction is deleted in the CRM (no query serves it any more): the one dated
    /// closest to `days` ago, a random one without `days`.
    Delete {
        /// How many days back the deleted transaction is dated.
        days: Option<u32>,
    },
    /// The newest transaction is served with `"transactionDate": null` (it stays in its day's
    /// results).
    NullDate,
    /// The newest lead gets a `notes` field of 1.5 MB (its event is larger than Kafka's
    /// default `message.max.bytes`).
    Bloat,
    /// The newest lead without notes gets a `notes` field of `count` × `text` (a record over
    /// 1 MB in few characters: `'ж'` takes 2 bytes, `'€'` 3).
    BloatWith {
        /// The character repeated.
        text: char,
        /// How many times.
        count: usize,
    },
    /// The newest transaction is served dated 400 days before its date, in its date's results
    /// (a CRM whose filter and shown date differ).
    Misdated,
    /// The newest transaction and position write their numbers another way (`12.50` becomes
    /// `1250e-2`; the same numbers; needs `--numeric-money` to be visible as numbers).
    Reformat,
    /// A position closes.
    Position,
    /// A new live server appears, a customer opens an account on it and closes positions there.
    Server,
    /// The newest listed live server disappears from `/servers` (its data stays).
    RemoveServer,
    /// A removed server is listed again.
    RestoreServer,
}

impl ChangeKind {
    /// Parses a change kind from the `kind` parameter of `/_sim/mutate`.
    pub fn parse(s: &str) -> Option<ChangeKind> {
        Some(match s {
            "lead" | "new_lead" => ChangeKind::NewLead,
            "lead_edit" | "edit_lead" => ChangeKind::EditLead,
            "conversion" => ChangeKind::Conversion,
            "customer_edit" | "edit_customer" => ChangeKind::EditCustomer,
            "transaction" => ChangeKind::Transaction,
            "late_transaction" => ChangeKind::LateTransaction { days: 1 },
            "correction" => ChangeKind::Correction { days: None },
            "revert" => ChangeKind::Revert,
            "delete" => ChangeKind::Delete { days: None },
            "malform" => ChangeKind::Malform { days: None },
            "null_date" => ChangeKind::NullDate,
            "reformat" => ChangeKind::Reformat,
            "bloat" => ChangeKind::Bloat,
            "bloat_wide" => ChangeKind::BloatWith {
                text: 'ж',
                count: 600_000,
            },
            "misdated" => ChangeKind::Misdated,
            "position" => ChangeKind::Position,
            "server" => ChangeKind::Server,
            "server_remove" => ChangeKind::RemoveServer,
            "server_restore" => ChangeKind::RestoreServer,
            _ => return None,
        })
    }
}

/// Sizes and options of generated data.
#[derive(Debug, Clone)]
pub struct GenSpec {
    /// Random seed.
    pub seed: u64,
    /// First day records are spread from.
    pub start_date: NaiveDate,
    /// The CRM's time zone.
    pub tz: Tz,
    /// Leads.
    pub leads: usize,
    /// Customers.
    pub customers: usize,
    /// Transactions.
    pub transactions: usize,
    /// Closed positions.
    pub positions: usize,
    /// Live servers (one demo server is added).
    pub servers: usize,
    /// Serve money and quantities as JSON numbers instead of strings.
    pub numeric_money: bool,
    /// Fraction of records served with an unreadable date or amount.
    pub malformed_rate: f64,
    /// How values are written (sets' order, dates in other forms).
    pub quirks: ValueQuirks,
}

/// Ways of writing values that real CRMs have and the reference shapes do not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValueQuirks {
    /// Serve the tag categories, the tags of each category and the trading accounts of every
    /// record in a fresh random order on every answer (they are sets); each chosen tag
    /// category then holds two tags, so their order can vary.
    pub shuffle_sets: bool,
    /// Serve transactions' `transactionDate` as epoch seconds (a JSON number).
    pub epoch_seconds: bool,
    /// Write "no date" as a zero date: a customer without a first deposit has `"ftdDate":
    /// "0000-00-00 00:00:00"` instead of `null`.
    pub zero_dates: bool,
}

#[derive(Debug, Clone)]
struct Person {
    first: &'static str,
    last: &'static str,
    email: String,
    phone: String,
    country: u8,
    status: &'static str,
    affiliate: u16,
    campaign: u8,
    registered: i64,
    modified: i64,
    utm_source: u8,
    utm_medium: u8,
    tags: Vec<(u8, u8)>,
}

#[derive(Debug, Clone)]
struct Lead {
    id: i64,
    person: Person,
    malformed: bool,
    /// Size of a `notes` field of filler text in characters (0: none).
    notes_bytes: usize,
    /// The character `notes` repeats.
    notes_char: char,
}

#[derive(Debug, Clone)]
struct Customer {
    customer_id: i64,
    lead_id: i64,
    person: Person,
    converted: i64,
    accounts: Vec<(u64, u16)>,
    ftd: Option<i64>,
    balance_cents: i64,
    malformed: bool,
}

#[derive(Debug, Clone)]
struct Transaction {
    id: i64,
    customer_id: Option<i64>,
    deposit: bool,
    amount_cents: i64,
    eur: bool,
    date: i64,
    method: u8,
    account: Option<(u64, u16)>,
    product_id: Option<u64>,
    fake: bool,
    malformed: bool,
    date_hidden: bool,
    reformatted: bool,
    /// Served dated [`MISDATED_DAYS`] before its date (it stays in its date's results).
    misdated: bool,
    /// Deleted in the CRM: served by no query and left out of the truth.
    deleted: bool,
}

/// How far before its date a `misdated` transaction is served.
const MISDATED_DAYS: i64 = 400;

#[derive(Debug, Clone)]
struct Server {
    id: String,
    name: String,
    platform: &'static str,
    live: bool,
    /// Whether `/servers` lists it (a removed server's data stays).
    listed: bool,
}

#[derive(Debug, Clone)]
struct Position {
    id: i64,
    login: u64,
    server: u16,
    customer_id: Option<i64>,
    symbol: u8,
    buy: bool,
    volume_centilots: i64,
    open_price: i64,
    close_price: i64,
    open: i64,
    close: i64,
    profit_cents: i64,
    commission_cents: i64,
    swap_cents: i64,
    malformed: bool,
    reformatted: bool,
}

/// Every record the simulated CRM holds.
pub struct SimData {
    tz: Tz,
    rng: fastrand::Rng,
    malformed_rate: f64,
    leads: Vec<Lead>,
    customers: Vec<Customer>,
    transactions: Vec<Transaction>,
    servers: Vec<Server>,
    positions: Vec<Position>,
    next_login: u64,
    /// Serve money and quantities as JSON numbers instead of strings.
    numeric_money: bool,
    /// Corrections made, newest last: each record's kind, index and previous cents.
    corrections: Vec<Vec<(Kind, usize, i64)>>,
    /// How values are written.
    quirks: ValueQuirks,
    /// Records rendered so far: seeds the order of sets with `shuffle_sets`.
    renders: std::sync::atomic::AtomicU64,
    /// The records matching recent queries (modification instant, index), in index order:
    /// the pages of one window are cut from one scan, as a real CRM's index would serve
    /// them. Emptied by every change.
    matched: std::sync::Mutex<HashMap<DataQuery, Matches>>,
}

/// The records a query matches: (modification instant, index), in index order.
type Matches = Arc<Vec<(i64, usize)>>;

/// Most queries whose matches [`SimData`] keeps.
const MATCHED_QUERIES: usize = 64;

/// The order a page is cut from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOrder {
    /// Record order (stable).
    Id,
    /// Newest-modified first (records move as they change).
    NewestFirst,
    /// A random order from this seed (a database paging without `ORDER BY`).
    Random(u64),
}

/// A page query against the data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataQuery {
    /// Entity kind.
    pub kind: Kind,
    /// Filter on the modification date instead of the creation date (leads, customers).
    pub by_modified: bool,
    /// First instant (inclusive), epoch seconds.
    pub from: i64,
    /// Last instant (exclusive), epoch seconds.
    pub until: i64,
    /// Server tag (positions).
    pub server_tag: Option<String>,
    /// Include fake transactions.
    pub include_fake: bool,
}

impl SimData {
    /// Generates the data of `spec`, spread from `spec.start_date` to `now`.
    pub fn generate(spec: &GenSpec, now: DateTime<Utc>) -> SimData {
        let mut rng = fastrand::Rng::with_seed(spec.seed);
        let start = spec
            .start_date
            .and_hms_opt(0, 0, 0)
            .map(|t| local_to_utc(t, spec.tz).timestamp())
            .unwrap_or(0);
        let now = now.timestamp().max(start + 1);
        let mut data = SimData {
            tz: spec.tz,
            rng: fastrand::Rng::with_seed(spec.seed.wrapping_add(1)),
            malformed_rate: spec.malformed_rate,
            leads: Vec::with_capacity(spec.leads),
            customers: Vec::with_capacity(spec.customers),
            transactions: Vec::with_capacity(spec.transactions),
            servers: Vec::new(),
            positions: Vec::with_capacity(spec.positions),
            next_login: 100_000,
            numeric_money: spec.numeric_money,
            corrections: Vec::new(),
            quirks: spec.quirks,
            renders: std::sync::atomic::AtomicU64::new(spec.seed),
            matched: Default::default(),
        };
        for i in 0..spec.servers.max(1) {
            data.servers.push(live_server(i));
        }
        data.servers.push(Server {
            id: "mt4-demo-01".to_owned(),
            name: "MT4 Demo".to_owned(),
            platform: "mt4",
            live: false,
            listed: true,
        });
        let malformed =
            |rng: &mut fastrand::Rng| spec.malformed_rate > 0.0 && rng.f64() < spec.malformed_rate;
        let mut registered: Vec<i64> = (0..spec.leads).map(|_| rng.i64(start..now)).collect();
        registered.sort_unstable();
        for (i, reg) in registered.into_iter().enumerate() {
            let status = LEAD_STATUSES[rng.usize(..LEAD_STATUSES.len())];
            let person = random_person(&mut rng, 100_000 + i as i64, reg, now, status);
            data.leads.push(Lead {
                id: 100_000 + i as i64,
                person,
                malformed: malformed(&mut rng),
                notes_bytes: 0,
                notes_char: 'n',
            });
        }
        for i in 0..spec.customers {
            let customer_id = 5_000 + i as i64;
            let converted_lead =
                (spec.customers <= spec.leads).then(|| i * spec.leads / spec.customers);
            let (lead_id, mut person) = match converted_lead {
                Some(index) => {
                    let lead = &mut data.leads[index];
                    lead.person.status = "Converted";
                    (lead.id, lead.person.clone())
                }
                None => {
                    let reg = rng.i64(start..now);
                    (
                        90_000_000 + i as i64,
                        random_person(&mut rng, 90_000_000 + i as i64, reg, now, "New"),
                    )
                }
            };
            let converted =
                person.registered + rng.i64(0..=(now - person.registered).min(30 * 86_400));
            person.status = CUSTOMER_STATUSES[rng.usize(..CUSTOMER_STATUSES.len())];
            let ftd = rng
                .bool()
                .then(|| converted + rng.i64(0..=(now - converted).min(86_400)));
            person.modified = ftd.unwrap_or(converted).max(person.modified);
            let accounts = (0..rng.usize(1..=2))
                .map(|_| data.new_account(&mut rng))
                .collect();
            if let Some(index) = converted_lead {
                // Converting touched the lead too.
                let lead = &mut data.leads[index].person;
                lead.modified = lead.modified.max(converted);
            }
            data.customers.push(Customer {
                customer_id,
                lead_id,
                person,
                converted,
                accounts,
                ftd,
                balance_cents: rng.i64(0..5_000_000),
                malformed: malformed(&mut rng),
            });
        }
        let txn_dates = data.customer_times(&mut rng, spec.transactions, start, now);
        for (i, (date, c)) in txn_dates.into_iter().enumerate() {
            let customer = data.customers.get(c);
            let fake = rng.f64() < 0.03;
            data.transactions.push(Transaction {
                id: 9_000_000 + i as i64,
                customer_id: customer.map(|c| c.customer_id),
                deposit: rng.f64() < 0.7,
                amount_cents: rng.i64(1_000..2_500_000),
                eur: rng.f64() < 0.3,
                date,
                method: rng.u8(..PAYMENT_METHODS.len() as u8),
                account: customer.and_then(|c| c.accounts.first().copied()),
                product_id: (rng.f64() < 0.2).then(|| rng.u64(1_000_000..9_999_999)),
                fake,
                malformed: malformed(&mut rng),
                date_hidden: false,
                reformatted: false,
                misdated: false,
                deleted: false,
            });
        }
        let closes = data.customer_times(&mut rng, spec.positions, start, now);
        let live = data.live_server_indices();
        for (close, c) in closes {
            let (customer_id, account) = match data.customers.get(c) {
                Some(customer) => (
                    Some(customer.customer_id),
                    customer.accounts[rng.usize(..customer.accounts.len())],
                ),
                None => (None, (data.next_login(), live[rng.usize(..live.len())])),
            };
            let m = malformed(&mut rng);
            data.push_position(&mut rng, customer_id, account, close, m);
        }
        data
    }

    /// Draws `count` (instant, customer index) pairs, each instant after that customer's
    /// conversion, sorted by instant; the index is `usize::MAX` when there are no customers.
    fn customer_times(
        &self,
        rng: &mut fastrand::Rng,
        count: usize,
        start: i64,
        now: i64,
    ) -> Vec<(i64, usize)> {
        let mut times: Vec<(i64, usize)> = (0..count)
            .map(|_| {
                let c = if self.customers.is_empty() {
                    usize::MAX
                } else {
                    rng.usize(..self.customers.len())
                };
                let from = self.customers.get(c).map_or(start, |c| c.converted);
                (rng.i64(from..=now), c)
            })
            .collect();
        times.sort_unstable();
        times
    }

    fn next_login(&mut self) -> u64 {
        self.next_login += 1;
        self.next_login
    }

    fn new_account(&mut self, rng: &mut fastrand::Rng) -> (u64, u16) {
        let live: Vec<u16> = self.live_server_indices();
        let server = live[rng.usize(..live.len())];
        (self.next_login(), server)
    }

    fn live_server_indices(&self) -> Vec<u16> {
        self.servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live && s.listed)
            .map(|(i, _)| i as u16)
            .collect()
    }

    fn push_position(
        &mut self,
        rng: &mut fastrand::Rng,
        customer_id: Option<i64>,
        account: (u64, u16),
        close: i64,
        malformed: bool,
    ) -> usize {
        let symbol = rng.u8(..SYMBOLS.len() as u8);
        let base = SYMBOLS[symbol as usize].1;
        let open_price = base + rng.i64(-(base / 50)..=(base / 50));
        let close_price = open_price + rng.i64(-(base / 200)..=(base / 200));
        let buy = rng.bool();
        let volume_centilots = rng.i64(1..=1_000);
        let profit_cents =
            (close_price - open_price) * if buy { 1 } else { -1 } * volume_centilots * 100_000
                / base.max(1);
        self.positions.push(Position {
            id: 77_000_000 + self.positions.len() as i64,
            login: account.0,
            server: account.1,
            customer_id,
            symbol,
            buy,
            volume_centilots,
            open_price,
            close_price,
            open: close - rng.i64(60..=3 * 86_400),
            close,
            profit_cents,
            commission_cents: -(volume_centilots * 7).max(1),
            swap_cents: rng.i64(-500..=200),
            malformed,
            reformatted: false,
        });
        self.positions.len() - 1
    }

    /// Returns the ids of the live servers.
    pub fn live_server_tags(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.live && s.listed)
            .map(|s| s.id.clone())
            .collect()
    }

    /// Returns the records a query matches as (modification or event time, index), in id
    /// order.
    fn matches<'a>(&'a self, query: &'a DataQuery) -> Box<dyn Iterator<Item = (i64, usize)> + 'a> {
        let in_range = move |t: i64| t >= query.from && t < query.until;
        match query.kind {
            Kind::Leads => Box::new(
                self.leads
                    .iter()
                    .enumerate()
                    .filter(move |(_, l)| {
                        in_range(if query.by_modified {
                            l.person.modified
                        } else {
                            l.person.registered
                        })
                    })
                    .map(|(i, l)| (l.person.modified, i)),
            ),
            Kind::Customers => Box::new(
                self.customers
                    .iter()
                    .enumerate()
                    .filter(move |(_, c)| {
                        in_range(if query.by_modified {
                            c.person.modified
                        } else {
                            c.person.registered
                        })
                    })
                    .map(|(i, c)| (c.person.modified, i)),
            ),
            Kind::Transactions => Box::new(
                self.transactions
                    .iter()
                    .enumerate()
                    .filter(move |(_, t)| {
                        in_range(t.date) && (query.include_fake || !t.fake) && !t.deleted
                    })
                    .map(|(i, t)| (t.date, i)),
            ),
            Kind::Positions => {
                let server = query
                    .server_tag
                    .as_deref()
                    .and_then(|tag| self.servers.iter().position(|s| s.id == tag));
                match server {
                    Some(server) => Box::new(
                        self.positions
                            .iter()
                            .enumerate()
                            .filter(move |(_, p)| {
                                usize::from(p.server) == server && in_range(p.close)
                            })
                            .map(|(i, p)| (p.close, i)),
                    ),
                    None => Box::new(std::iter::empty()),
                }
            }
            Kind::Servers => Box::new(
                (0..self.servers.len())
                    .filter(|&i| self.servers[i].listed)
                    .map(|i| (0, i)),
            ),
        }
    }

    /// Returns how many records a query matches and the indices of page `skip..skip+take`,
    /// in serving `order`.
    pub fn select_page(
        &self,
        query: &DataQuery,
        order: PageOrder,
        skip: usize,
        take: usize,
    ) -> (usize, Vec<usize>) {
        let all = self.matching(query);
        let total = all.len();
        let page = match order {
            PageOrder::Id => all.iter().skip(skip).take(take).map(|(_, i)| *i).collect(),
            PageOrder::NewestFirst => {
                let mut all = all.to_vec();
                all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                all.iter().skip(skip).take(take).map(|(_, i)| *i).collect()
            }
            PageOrder::Random(seed) => {
                let mut all: Vec<usize> = all.iter().map(|(_, i)| *i).collect();
                fastrand::Rng::with_seed(seed).shuffle(&mut all);
                all.into_iter().skip(skip).take(take).collect()
            }
        };
        (total, page)
    }

    /// Returns the records matching `query`, from the cache when it holds them.
    fn matching(&self, query: &DataQuery) -> Matches {
        if let Some(all) = self.matched().get(query) {
            return all.clone();
        }
        let all = Arc::new(self.matches(query).collect::<Vec<_>>());
        let mut matched = self.matched();
        if matched.len() >= MATCHED_QUERIES {
            matched.clear();
        }
        matched.insert(query.clone(), all.clone());
        all
    }

    fn matched(&self) -> std::sync::MutexGuard<'_, HashMap<DataQuery, Matches>> {
        self.matched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renders one record of `kind` as the API serves it.
    pub fn render(&self, kind: Kind, index: usize) -> Value {
        match kind {
            Kind::Leads => self.render_lead(&self.leads[index]),
            Kind::Customers => self.render_customer(&self.customers[index]),
            Kind::Transactions => {
                serde_json::to_value(self.transaction_wire(&self.transactions[index]))
                    .unwrap_or_default()
            }
            Kind::Positions => {
                serde_json::to_value(self.position_wire(&self.positions[index])).unwrap_or_default()
            }
            Kind::Servers => {
                let s = &self.servers[index];
                json!({"id": s.id, "name": s.name, "type": if s.live { "live" } else { "demo" }})
            }
        }
    }

    /// Renders the servers answer, grouped by platform.
    pub fn render_servers(&self) -> Value {
        let mut groups = serde_json::Map::new();
        for (i, server) in self.servers.iter().enumerate().filter(|(_, s)| s.listed) {
            let group = groups
                .entry(server.platform.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(items) = group {
                items.push(self.render(Kind::Servers, i));
            }
        }
        Value::Object(groups)
    }

    /// Renders every current record of `kind` (the ground truth); servers carry their
    /// platform group as `platform`, as the client reads them from the grouped answer, and
    /// removed servers are left out, as `/servers` leaves them out.
    pub fn truth(&self, kind: Kind) -> Vec<Value> {
        let count = match kind {
            Kind::Leads => self.leads.len(),
            Kind::Customers => self.customers.len(),
            Kind::Transactions => self.transactions.len(),
            Kind::Servers => self.servers.len(),
            Kind::Positions => self.positions.len(),
        };
        (0..count)
            .filter(|&i| kind != Kind::Servers || self.servers[i].listed)
            .filter(|&i| kind != Kind::Transactions || !self.transactions[i].deleted)
            .map(|i| {
                let mut record = self.render(kind, i);
                if let (Kind::Servers, Value::Object(map)) = (kind, &mut record) {
                    // The API groups servers by platform; a flat list says it per server.
                    map.insert("platform".to_owned(), json!(self.servers[i].platform));
                }
                record
            })
            .collect()
    }

    fn time(&self, secs: i64) -> String {
        format_local(
            DateTime::from_timestamp(secs, 0).unwrap_or_default(),
            self.tz,
        )
    }

    /// Returns a random order for the sets of one answer's record (`shuffle_sets`), or
    /// `None` to serve them in their own order.
    fn set_order(&self) -> Option<fastrand::Rng> {
        self.quirks.shuffle_sets.then(|| {
            let n = self
                .renders
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            fastrand::Rng::with_seed(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        })
    }

    fn person_fields(&self, p: &Person, malformed: bool) -> serde_json::Map<String, Value> {
        let (country, language) = COUNTRIES[p.country as usize];
        let mut order = self.set_order();
        let mut tags: Vec<Value> = TAGS
            .iter()
            .enumerate()
            .filter_map(|(ci, (category, names))| {
                let mut chosen: Vec<&str> = p
                    .tags
                    .iter()
                    .filter(|(c, _)| usize::from(*c) == ci)
                    .flat_map(|(_, t)| {
                        let second = order
                            .is_some()
                            .then(|| names[(*t as usize + 1) % names.len()]);
                        std::iter::once(names[*t as usize]).chain(second)
                    })
                    .collect();
                if let Some(rng) = order.as_mut() {
                    rng.shuffle(&mut chosen);
                }
                (!chosen.is_empty()).then(|| json!({"category": category, "tags": chosen}))
            })
            .collect();
        if let Some(rng) = order.as_mut() {
            rng.shuffle(&mut tags);
        }
        let registration = if malformed {
            "31/02/2024 25:61".to_owned()
        } else {
            self.time(p.registered)
        };
        let value = json!({
            "firstName": p.first,
            "lastName": p.last,
            "email": p.email,
            "phone": p.phone,
            "country": country,
            "language": language,
            "status": p.status,
            "affiliateId": format!("IB-{}", p.affiliate),
            "campaign": CAMPAIGNS[p.campaign as usize],
            "registrationDate": registration,
            "lastModifiedDate": self.time(p.modified),
            "utmDetails": {
                "utmSource": UTM_SOURCES[p.utm_source as usize],
                "utmMedium": UTM_MEDIUMS[p.utm_medium as usize],
                "utmCampaign": CAMPAIGNS[p.campaign as usize],
                "utmContent": null,
                "utmTerm": null,
            },
            "tags": tags,
        });
        match value {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }

    fn render_lead(&self, lead: &Lead) -> Value {
        let mut map = self.person_fields(&lead.person, lead.malformed);
        map.insert("id".to_owned(), json!(lead.id));
        if lead.notes_bytes > 0 {
            let notes: String = std::iter::repeat_n(lead.notes_char, lead.notes_bytes).collect();
            map.insert("notes".to_owned(), json!(notes));
        }
        Value::Object(map)
    }

    fn render_customer(&self, c: &Customer) -> Value {
        let mut map = self.person_fields(&c.person, false);
        let mut accounts: Vec<String> = c
            .accounts
            .iter()
            .map(|(login, server)| {
                format!("({login}, {}, live)", self.servers[usize::from(*server)].id)
            })
            .collect();
        if let Some(mut rng) = self.set_order() {
            rng.shuffle(&mut accounts);
        }
        map.insert("customerId".to_owned(), json!(c.customer_id));
        map.insert("leadId".to_owned(), json!(c.lead_id));
        map.insert("conversionDate".to_owned(), json!(self.time(c.converted)));
        map.insert("userAdditionalId".to_owned(), json!(accounts.join(", ")));
        let no_date = if self.quirks.zero_dates {
            json!("0000-00-00 00:00:00")
        } else {
            Value::Null
        };
        map.insert(
            "ftdDate".to_owned(),
            c.ftd.map_or(no_date, |t| json!(self.time(t))),
        );
        let balance = if c.malformed {
            "1.520,40".to_owned()
        } else {
            money(c.balance_cents)
        };
        map.insert("balanceUsd".to_owned(), json!(balance));
        Value::Object(map)
    }

    fn transaction_wire<'a>(&'a self, t: &Transaction) -> TransactionWire<'a> {
        // EUR converts at 1.08 exactly: amountUsd stays a whole number of cents.
        let usd_cents = if t.eur {
            t.amount_cents * 108 / 100
        } else {
            t.amount_cents
        };
        let sign = if t.deposit { 1 } else { -1 };
        let form = self.money_form(t.reformatted);
        let m = |text: String| Money { text, form };
        TransactionWire {
            id: t.id,
            customer_id: t.customer_id,
            kind: if t.deposit { "Deposit" } else { "Withdrawal" },
            amount: if t.malformed {
                Money {
                    text: "12,50.x".to_owned(),
                    form: MoneyForm::Text,
                }
            } else {
                m(money(sign * t.amount_cents))
            },
            currency: if t.eur { "EUR" } else { "USD" },
            amount_usd: m(money(sign * usd_cents)),
            transaction_date: (!t.date_hidden).then(|| {
                let date = if t.misdated {
                    t.date - MISDATED_DAYS * 86_400
                } else {
                    t.date
                };
                if self.quirks.epoch_seconds {
                    WireDate::Seconds(date)
                } else {
                    WireDate::Text(self.time(date))
                }
            }),
            payment_method: PAYMENT_METHODS[t.method as usize],
            trading_account: t.account.map(|(login, _)| login.to_string()),
            server_tag: t
                .account
                .map(|(_, s)| self.servers[usize::from(s)].id.as_str()),
            product_id: t
                .product_id
                .map_or_else(|| "N/A".to_owned(), |p| p.to_string()),
            is_fake: t.fake,
        }
    }

    fn position_wire<'a>(&'a self, p: &Position) -> PositionWire<'a> {
        let (symbol, _) = SYMBOLS[p.symbol as usize];
        let price_scale = if symbol == "USDJPY" { 3 } else { 5 };
        let form = self.money_form(p.reformatted);
        let m = |text: String| Money { text, form };
        PositionWire {
            position_id: p.id,
            login: p.login.to_string(),
            server_tag: &self.servers[usize::from(p.server)].id,
            customer_id: p.customer_id,
            symbol,
            side: if p.buy { "Buy" } else { "Sell" },
            volume: m(Decimal::new(p.volume_centilots, 2).to_string()),
            open_price: m(Decimal::new(p.open_price, price_scale).to_string()),
            close_price: m(Decimal::new(p.close_price, price_scale).to_string()),
            open_time: self.time(p.open),
            close_time: self.time(p.close),
            profit: if p.malformed {
                Money {
                    text: "NaN".to_owned(),
                    form: MoneyForm::Text,
                }
            } else {
                m(money(p.profit_cents))
            },
            commission: m(money(p.commission_cents)),
            swap: m(money(p.swap_cents)),
            currency: "USD",
        }
    }

    fn money_form(&self, reformatted: bool) -> MoneyForm {
        match (self.numeric_money, reformatted) {
            (false, _) => MoneyForm::Text,
            (true, false) => MoneyForm::Number,
            (true, true) => MoneyForm::Exponent,
        }
    }

    /// Writes one record of `kind` as the API serves it. Positions and transactions, the
    /// bulk of every benchmark, go straight from their wire structs to JSON text.
    pub fn write_record(&self, kind: Kind, index: usize, out: &mut Vec<u8>) {
        // Writing JSON into a Vec cannot fail.
        let _ = match kind {
            Kind::Positions => {
                serde_json::to_writer(out, &self.position_wire(&self.positions[index]))
            }
            Kind::Transactions => {
                serde_json::to_writer(out, &self.transaction_wire(&self.transactions[index]))
            }
            _ => serde_json::to_writer(out, &self.render(kind, index)),
        };
    }

    /// Applies `count` random changes stamped `now` (of `kind` if given) and returns them.
    pub fn mutate(
        &mut self,
        count: usize,
        kind: Option<ChangeKind>,
        now: DateTime<Utc>,
    ) -> Vec<Change> {
        self.matched().clear();
        let mut changes = Vec::new();
        for _ in 0..count {
            let kind = kind.unwrap_or_else(|| match self.rng.u8(..100) {
                0..=24 => ChangeKind::NewLead,
                25..=44 => ChangeKind::EditLead,
                45..=54 => ChangeKind::Conversion,
                55..=64 => ChangeKind::EditCustomer,
                65..=84 => ChangeKind::Transaction,
                _ => ChangeKind::Position,
            });
            self.apply(kind, now.timestamp(), &mut changes);
        }
        changes
    }

    fn apply(&mut self, kind: ChangeKind, now: i64, changes: &mut Vec<Change>) {
        let mut rng = std::mem::replace(&mut self.rng, fastrand::Rng::with_seed(0));
        let change = |stream, op, key: String| Change { stream, op, key };
        match kind {
            ChangeKind::NewLead => {
                let id = self.leads.last().map_or(100_000, |l| l.id + 1);
                let person = random_person(&mut rng, id, now, now, "New");
                let malformed = self.malformed_rate > 0.0 && rng.f64() < self.malformed_rate;
                self.leads.push(Lead {
                    id,
                    person,
                    malformed,
                    notes_bytes: 0,
                    notes_char: 'n',
                });
                changes.push(change("leads", "created", id.to_string()));
            }
            ChangeKind::EditLead if !self.leads.is_empty() => {
                let index = rng.usize(..self.leads.len());
                let lead = &mut self.leads[index];
                if lead.person.status == "Converted" || rng.bool() {
                    lead.person.phone = random_phone(&mut rng);
                } else {
                    lead.person.status = next_status(&LEAD_STATUSES, lead.person.status);
                }
                lead.person.modified = now.max(lead.person.modified);
                changes.push(change("leads", "updated", lead.id.to_string()));
            }
            ChangeKind::Conversion => {
                let candidates = self.leads.len();
                let start = if candidates == 0 {
                    0
                } else {
                    rng.usize(..candidates)
                };
                let found = (0..candidates)
                    .map(|i| (start + i) % candidates)
                    .find(|&i| self.leads[i].person.status != "Converted");
                if let Some(i) = found {
                    let lead = &mut self.leads[i];
                    lead.person.status = "Converted";
                    lead.person.modified = now.max(lead.person.modified);
                    let (lead_id, mut person) = (lead.id, lead.person.clone());
                    person.status = "Active";
                    let customer_id = self.customers.last().map_or(5_000, |c| c.customer_id + 1);
                    let account = self.new_account(&mut rng);
                    self.customers.push(Customer {
                        customer_id,
                        lead_id,
                        person,
                        converted: now,
                        accounts: vec![account],
                        ftd: None,
                        balance_cents: 0,
                        malformed: false,
                    });
                    changes.push(change("leads", "updated", lead_id.to_string()));
                    changes.push(change("customers", "created", customer_id.to_string()));
                } else {
                    self.apply(ChangeKind::NewLead, now, changes);
                }
            }
            ChangeKind::EditCustomer if !self.customers.is_empty() => {
                let index = rng.usize(..self.customers.len());
                let c = &mut self.customers[index];
                match rng.u8(..3) {
                    0 => c.person.phone = random_phone(&mut rng),
                    1 => c.person.status = next_status(&CUSTOMER_STATUSES, c.person.status),
                    _ => {
                        c.person.email = format!(
                            "{}.{}{}@example.net",
                            c.person.first.to_lowercase(),
                            c.person.last.to_lowercase(),
                            rng.u16(..1000)
                        )
                    }
                }
                c.person.modified = now.max(c.person.modified);
                changes.push(change("customers", "updated", c.customer_id.to_string()));
            }
            ChangeKind::Transaction if !self.customers.is_empty() => {
                self.add_transaction(&mut rng, now, now, changes)
            }
            ChangeKind::LateTransaction { days } if !self.customers.is_empty() => {
                self.add_transaction(&mut rng, now, now - i64::from(days) * 86_400, changes)
            }
            ChangeKind::Correction { days } => {
                let target = days.map(|d| now - i64::from(d) * 86_400);
                let mut undo = Vec::new();
                let transaction = self.pick(Kind::Transactions, target, &mut rng);
                if let Some(i) = transaction {
                    let t = &mut self.transactions[i];
                    undo.push((Kind::Transactions, i, t.amount_cents));
                    t.amount_cents += 100;
                    changes.push(change("transactions", "updated", t.id.to_string()));
                }
                if let Some(i) = self.pick(Kind::Positions, target, &mut rng) {
                    undo.push((Kind::Positions, i, self.positions[i].profit_cents));
                    self.positions[i].profit_cents += 100;
                    changes.push(change("positions", "updated", self.position_key(i)));
                }
                self.corrections.push(undo);
            }
            ChangeKind::Revert => {
                for (kind, i, cents) in self.corrections.pop().unwrap_or_default() {
                    if kind == Kind::Transactions {
                        self.transactions[i].amount_cents = cents;
                        let id = self.transactions[i].id.to_string();
                        changes.push(change("transactions", "updated", id));
                    } else {
                        self.positions[i].profit_cents = cents;
                        changes.push(change("positions", "updated", self.position_key(i)));
                    }
                }
            }
            ChangeKind::Malform { days } => {
                let target = days.map(|d| now - i64::from(d) * 86_400);
                if let Some(i) = self.pick(Kind::Transactions, target, &mut rng) {
                    self.transactions[i].malformed = true;
                    let id = self.transactions[i].id.to_string();
                    changes.push(change("transactions", "malformed", id));
                }
            }
            ChangeKind::Delete { days } => {
                let target = days.map(|d| now - i64::from(d) * 86_400);
                if let Some(i) = self.pick(Kind::Transactions, target, &mut rng) {
                    self.transactions[i].deleted = true;
                    let id = self.transactions[i].id.to_string();
                    changes.push(change("transactions", "deleted", id));
                }
            }
            ChangeKind::Bloat => {
                if let Some(lead) = self.leads.iter_mut().rev().find(|l| !l.malformed) {
                    lead.notes_bytes = 1_500_000;
                    lead.person.modified = now.max(lead.person.modified);
                    changes.push(change("leads", "updated", lead.id.to_string()));
                }
            }
            ChangeKind::BloatWith { text, count } => {
                let bloated = self
                    .leads
                    .iter_mut()
                    .rev()
                    .find(|l| !l.malformed && l.notes_bytes == 0);
                if let Some(lead) = bloated {
                    lead.notes_bytes = count;
                    lead.notes_char = text;
                    lead.person.modified = now.max(lead.person.modified);
                    changes.push(change("leads", "updated", lead.id.to_string()));
                }
            }
            ChangeKind::Misdated => {
                if let Some(i) = self.pick(Kind::Transactions, Some(now), &mut rng) {
                    self.transactions[i].misdated = true;
                    let id = self.transactions[i].id.to_string();
                    changes.push(change("transactions", "updated", id));
                }
            }
            ChangeKind::NullDate => {
                if let Some(i) = self.pick(Kind::Transactions, Some(now), &mut rng) {
                    self.transactions[i].date_hidden = true;
                    let id = self.transactions[i].id.to_string();
                    changes.push(change("transactions", "updated", id));
                }
            }
            ChangeKind::Reformat => {
                if let Some(i) = self.pick(Kind::Transactions, Some(now), &mut rng) {
                    self.transactions[i].reformatted = true;
                    let id = self.transactions[i].id.to_string();
                    changes.push(change("transactions", "reformatted", id));
                }
                if let Some(i) = self.pick(Kind::Positions, Some(now), &mut rng) {
                    self.positions[i].reformatted = true;
                    changes.push(change("positions", "reformatted", self.position_key(i)));
                }
            }
            ChangeKind::Position if !self.customers.is_empty() => {
                let c = &self.customers[rng.usize(..self.customers.len())];
                let account = c.accounts[rng.usize(..c.accounts.len())];
                let customer_id = c.customer_id;
                let i = self.push_position(&mut rng, Some(customer_id), account, now, false);
                changes.push(change("positions", "created", self.position_key(i)));
            }
            ChangeKind::Server => {
                let index = self.servers.iter().filter(|s| s.live).count();
                let server = live_server(index);
                let tag = server.id.clone();
                self.servers.push(server);
                let server_index = (self.servers.len() - 1) as u16;
                changes.push(change("servers", "created", tag));
                if !self.customers.is_empty() {
                    let ci = rng.usize(..self.customers.len());
                    let login = self.next_login();
                    let c = &mut self.customers[ci];
                    c.accounts.push((login, server_index));
                    c.person.modified = now.max(c.person.modified);
                    let customer_id = c.customer_id;
                    changes.push(change("customers", "updated", customer_id.to_string()));
                    for _ in 0..3 {
                        let i = self.push_position(
                            &mut rng,
                            Some(customer_id),
                            (login, server_index),
                            now,
                            false,
                        );
                        changes.push(change("positions", "created", self.position_key(i)));
                    }
                }
            }
            ChangeKind::RemoveServer => {
                if let Some(server) = self.servers.iter_mut().rev().find(|s| s.live && s.listed) {
                    server.listed = false;
                    changes.push(change("servers", "removed", server.id.clone()));
                }
            }
            ChangeKind::RestoreServer => {
                if let Some(server) = self.servers.iter_mut().find(|s| !s.listed) {
                    server.listed = true;
                    changes.push(change("servers", "restored", server.id.clone()));
                }
            }
            // Edits of entities that do not exist yet become creations.
            ChangeKind::EditLead => {
                self.rng = rng;
                return self.apply(ChangeKind::NewLead, now, changes);
            }
            ChangeKind::EditCustomer
            | ChangeKind::Transaction
            | ChangeKind::LateTransaction { .. }
            | ChangeKind::Position => {
                self.rng = rng;
                return self.apply(ChangeKind::Conversion, now, changes);
            }
        }
        self.rng = rng;
    }

    /// Returns a readable, real (not fake, not malformed) transaction or position not
    /// corrected or reformatted before: the one dated closest to `target`, or a random one.
    fn pick(&self, kind: Kind, target: Option<i64>, rng: &mut fastrand::Rng) -> Option<usize> {
        let candidates: Vec<(usize, i64)> = match kind {
            Kind::Transactions => self
                .transactions
                .iter()
                .enumerate()
                .filter(|(_, t)| {
                    !t.fake
                        && !t.malformed
                        && !t.date_hidden
                        && !t.reformatted
                        && !t.misdated
                        && !t.deleted
                })
                .map(|(i, t)| (i, t.date))
                .collect(),
            Kind::Positions => self
                .positions
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    !p.malformed && !p.reformatted && self.servers[usize::from(p.server)].live
                })
                .map(|(i, p)| (i, p.close))
                .collect(),
            _ => Vec::new(),
        };
        let touched = |i: usize| {
            self.corrections
                .iter()
                .flatten()
                .any(|(k, j, _)| *k == kind && *j == i)
        };
        let candidates: Vec<(usize, i64)> = candidates
            .into_iter()
            .filter(|(i, _)| !touched(*i))
            .collect();
        match target {
            Some(target) => candidates
                .into_iter()
                .min_by_key(|(_, date)| (date - target).abs())
                .map(|(i, _)| i),
            None if candidates.is_empty() => None,
            None => Some(candidates[rng.usize(..candidates.len())].0),
        }
    }

    /// A deposit or withdrawal dated `date`, booked `now` (a customer's first deposit also
    /// sets its `ftdDate`).
    fn add_transaction(
        &mut self,
        rng: &mut fastrand::Rng,
        now: i64,
        date: i64,
        changes: &mut Vec<Change>,
    ) {
        let ci = rng.usize(..self.customers.len());
        let id = self.transactions.last().map_or(9_000_000, |t| t.id + 1);
        let deposit = self.customers[ci].ftd.is_none() || rng.f64() < 0.7;
        let amount_cents = rng.i64(1_000..500_000);
        let customer = &mut self.customers[ci];
        self.transactions.push(Transaction {
            id,
            customer_id: Some(customer.customer_id),
            deposit,
            amount_cents,
            eur: false,
            date,
            method: rng.u8(..PAYMENT_METHODS.len() as u8),
            account: customer.accounts.first().copied(),
            product_id: None,
            fake: false,
            malformed: false,
            date_hidden: false,
            reformatted: false,
            misdated: false,
            deleted: false,
        });
        changes.push(Change {
            stream: "transactions",
            op: "created",
            key: id.to_string(),
        });
        if customer.ftd.is_none() && deposit {
            customer.ftd = Some(date);
            customer.person.modified = now.max(customer.person.modified);
            changes.push(Change {
                stream: "customers",
                op: "updated",
                key: customer.customer_id.to_string(),
            });
        }
        // The balance moves too, but it alone does not make the CRM touch lastModifiedDate.
        customer.balance_cents += if deposit { amount_cents } else { -amount_cents };
    }

    fn position_key(&self, index: usize) -> String {
        let p = &self.positions[index];
        format!("{}:{}", self.servers[usize::from(p.server)].id, p.id)
    }
}

fn live_server(index: usize) -> Server {
    let platform = if index % 2 == 0 { "mt4" } else { "mt5" };
    Server {
        id: format!("{platform}-live-{:02}", index + 1),
        name: format!("{} Live {}", platform.to_uppercase(), index + 1),
        platform,
        live: true,
        listed: true,
    }
}

fn random_person(
    rng: &mut fastrand::Rng,
    id: i64,
    registered: i64,
    now: i64,
    status: &'static str,
) -> Person {
    let first = FIRST_NAMES[rng.usize(..FIRST_NAMES.len())];
    let last = LAST_NAMES[rng.usize(..LAST_NAMES.len())];
    let mut tags = Vec::new();
    for category in 0..TAGS.len() as u8 {
        if rng.f64() < 0.3 {
            tags.push((category, rng.u8(..3)));
        }
    }
    Person {
        first,
        last,
        email: format!("{}.{}.{id}@example.org", ascii(first), ascii(last)),
        phone: random_phone(rng),
        country: rng.u8(..COUNTRIES.len() as u8),
        status,
        affiliate: rng.u16(1000..1100),
        campaign: rng.u8(..CAMPAIGNS.len() as u8),
        registered,
        modified: registered + rng.i64(0..=(now - registered).clamp(0, 60 * 86_400)),
        utm_source: rng.u8(..UTM_SOURCES.len() as u8),
        utm_medium: rng.u8(..UTM_MEDIUMS.len() as u8),
        tags,
    }
}

fn ascii(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_lowercase()
}

fn random_phone(rng: &mut fastrand::Rng) -> String {
    format!("+357{:08}", rng.u32(..100_000_000))
}

fn next_status(statuses: &[&'static str], current: &str) -> &'static str {
    let i = statuses.iter().position(|s| *s == current).unwrap_or(0);
    statuses[(i + 1) % statuses.len()]
}

fn money(cents: i64) -> String {
    Decimal::new(cents, 2).to_string()
}

/// Returns the UTC bounds `[from 00:00, to+1 00:00)` of inclusive local days.
pub fn day_bounds(from: NaiveDate, to: NaiveDate, tz: Tz) -> (i64, i64) {
    let start = from
        .and_hms_opt(0, 0, 0)
        .map_or(0, |t| local_to_utc(t, tz).timestamp());
    let end = (to + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .map_or(i64::MAX, |t| local_to_utc(t, tz).timestamp());
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GenSpec {
        GenSpec {
            seed: 7,
            start_date: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
            tz: Tz::UTC,
            leads: 300,
            customers: 100,
            transactions: 500,
            positions: 800,
            servers: 3,
            malformed_rate: 0.0,
            numeric_money: false,
            quirks: ValueQuirks::default(),
        }
    }

    #[test]
    fn pages_cut_from_remembered_matches_still_show_every_change() {
        let now = DateTime::from_timestamp(1_780_315_200, 0).unwrap();
        let mut data = SimData::generate(&spec(), now);
        let query = DataQuery {
            kind: Kind::Leads,
            by_modified: false,
            from: 0,
            until: now.timestamp() + 86_400,
            server_tag: None,
            include_fake: false,
        };
        let (before, first) = data.select_page(&query, PageOrder::Id, 0, 1000);
        assert_eq!(
            data.select_page(&query, PageOrder::Id, 0, 1000),
            (before, first)
        );
        data.mutate(1, Some(ChangeKind::NewLead), now);
        let (after, page) = data.select_page(&query, PageOrder::Id, 0, 1000);
        assert_eq!(after, before + 1, "the new lead is matched");
        assert_eq!(page.len(), after);
    }

    #[test]
    fn money_can_be_numbers_and_be_rewritten_as_the_same_numbers() {
        let now = DateTime::from_timestamp(1_780_315_200, 0).unwrap();
        let strings = SimData::generate(&spec(), now);
        let t = &strings.truth(Kind::Transactions)[0];
        assert!(t["amount"].is_string(), "{t}");
        let mut data = SimData::generate(
            &GenSpec {
                numeric_money: true,
                ..spec()
            },
            now,
        );
        let before = data.truth(Kind::Transactions);
        let changes = data.mutate(1, Some(ChangeKind::Reformat), now);
        let id: i64 = changes[0].key.parse().unwrap();
        let after = data.truth(Kind::Transactions);
        let find = |all: &[Value]| all.iter().find(|t| t["id"] == id).unwrap().clone();
        let (a, b) = (find(&before), find(&after));
        assert!(a["amount"].is_number() && b["amount"].is_number());
        let text = |v: &Value| v.as_number().unwrap().as_str().to_owned();
        assert_ne!(text(&a["amount"]), text(&b["amount"]));
        assert!(text(&b["amount"]).contains("e-2"), "{}", text(&b["amount"]));
        let value = |v: &Value| Decimal::from_scientific(&text(v)).or_else(|_| text(v).parse());
        assert_eq!(value(&a["amount"]).unwrap(), value(&b["amount"]).unwrap());
        // A correction and its revert give the record back as it was.
        let changes = data.mutate(1, Some(ChangeKind::Correction { days: Some(10) }), now);
        assert_eq!(changes.len(), 2);
        let corrected = data.truth(Kind::Transactions);
        data.mutate(1, Some(ChangeKind::Revert), now);
        let reverted = data.truth(Kind::Transactions);
        let key: i64 = changes[0].key.parse().unwrap();
        let find = |all: &[Value]| all.iter().find(|t| t["id"] == key).unwrap().clone();
        assert_ne!(find(&corrected), find(&after));
        assert_eq!(find(&reverted), find(&after));
    }

    #[test]
    fn generation_is_deterministic_by_seed() {
        let now = DateTime::parse_from_rfc3339("2024-06-01T12:00:00Z")
            .unwrap()
            .with_utc_timezone();
        let a = SimData::generate(&spec(), now);
        let b = SimData::generate(&spec(), now);
        assert_eq!(a.truth(Kind::Leads), b.truth(Kind::Leads));
        assert_eq!(a.truth(Kind::Positions), b.truth(Kind::Positions));
        let mut other = spec();
        other.seed = 8;
        assert_ne!(
            a.truth(Kind::Leads),
            SimData::generate(&other, now).truth(Kind::Leads)
        );
        assert_eq!(a.truth(Kind::Servers).len(), 4);
        assert_eq!(
            a.live_server_tags(),
            vec!["mt4-live-01", "mt5-live-02", "mt4-live-03"]
        );
    }

    #[test]
    fn mutations_report_what_they_changed() {
        let now = DateTime::parse_from_rfc3339("2024-06-01T12:00:00Z")
            .unwrap()
            .with_utc_timezone();
        let mut data = SimData::generate(&spec(), now);
        let before = data.truth(Kind::Leads).len();
        let changes = data.mutate(3, Some(ChangeKind::NewLead), now);
        assert_eq!(changes.len(), 3);
        assert_eq!(data.truth(Kind::Leads).len(), before + 3);
        let changes = data.mutate(1, Some(ChangeKind::Server), now);
        assert_eq!(
            changes[0],
            Change {
                stream: "servers",
                op: "created",
                key: "mt5-live-04".into()
            }
        );
        assert_eq!(
            changes.iter().filter(|c| c.stream == "positions").count(),
            3
        );
    }

    trait WithUtc {
        fn with_utc_timezone(self) -> DateTime<Utc>;
    }
    impl WithUtc for DateTime<chrono::FixedOffset> {
        fn with_utc_timezone(self) -> DateTime<Utc> {
            self.with_timezone(&Utc)
        }
    }
}
