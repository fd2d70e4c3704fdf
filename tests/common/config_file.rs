//! The configuration file the tests give the `ibstream` binary: one builder instead of a TOML
//! text written out in every suite.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// The streams, as their `[streams.<name>]` tables are named.
const STREAMS: [&str; 5] = ["leads", "customers", "transactions", "servers", "positions"];

/// An `ibstream` configuration file against the simulator and a broker, built as a TOML table.
///
/// [`ConfigFile::new`] holds what every test run shares: the simulator's credentials in
/// `[crm]` (1,000 requests per second, retries after 50 ms up to 1 s), the topics' prefix, the
/// broker, the prefix as `kafka.instance_id`, replication factor 1 (one broker) and the start
/// date of the simulator's data, 2024-01-01. [`ConfigFile::set`] and [`ConfigFile::remove`]
/// change a key by its dotted name (`"kafka.delivery"`), as the configuration reference names
/// it; a key set twice holds the last value, never two lines TOML would refuse.
#[derive(Clone)]
pub struct ConfigFile {
    table: Table,
}

impl ConfigFile {
    /// A run of `ibstream` against the simulator at `crm_url` writing topics `prefix.*` to the
    /// broker at `bootstrap`.
    pub fn new(crm_url: &str, prefix: &str, bootstrap: &str) -> ConfigFile {
        ConfigFile {
            table: Table::new(),
        }
        .set("crm.base_url", crm_url)
        .set("crm.email", "ib@example.com")
        .set("crm.password", "ib-secret")
        .set("crm.api_key", "sim-api-key")
        .set("crm.domain", "sim.example.com")
        .set("crm.requests_per_second", 1000)
        .set("crm.backoff_initial_ms", 50)
        .set("crm.backoff_max_ms", 1000)
        .set("topics.prefix", prefix)
        .set("kafka.bootstrap_servers", bootstrap)
        .set("kafka.instance_id", prefix)
        .set("kafka.replication_factor", 1)
        .set("streams.start_date", "2024-01-01")
    }

    /// Sets the key `dotted` (`table.key` or `table.sub.key`) to `value`, creating its tables.
    pub fn set(mut self, dotted: &str, value: impl Into<Value>) -> ConfigFile {
        let (path, key) = dotted.rsplit_once('.').expect("a key inside a table");
        let mut table = &mut self.table;
        for name in path.split('.') {
            table = table
                .entry(name)
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name} of {dotted} is a table"));
        }
        table.insert(key.to_owned(), value.into());
        self
    }

    /// Sets every key of `lines` (TOML `key = value` lines, as a test states a table's
    /// settings) in the table `table` (dotted: `"kafka.security"`).
    pub fn set_lines(self, table: &str, lines: &str) -> ConfigFile {
        let parsed: Table = lines
            .parse()
            .unwrap_or_else(|e| panic!("lines of [{table}] are TOML: {e}\n{lines}"));
        parsed.into_iter().fold(self, |config, (key, value)| {
            config.set(&format!("{table}.{key}"), value)
        })
    }

    /// Leaves the key `dotted` out (its default, or an environment variable, then holds).
    pub fn remove(mut self, dotted: &str) -> ConfigFile {
        let (path, key) = dotted.rsplit_once('.').expect("a key inside a table");
        let mut table = Some(&mut self.table);
        for name in path.split('.') {
            table = table
                .and_then(|t| t.get_mut(name))
                .and_then(Value::as_table_mut);
        }
        if let Some(table) = table {
            table.remove(key);
        }
        self
    }

    /// Polls every stream each second (the default is minutes), so a change shows within a
    /// test's patience.
    pub fn fast_polls(self) -> ConfigFile {
        STREAMS.iter().fold(self, |config, stream| {
            config.set(&format!("streams.{stream}.poll_interval_secs"), 1)
        })
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table serialises")
    }

    /// Writes the file as `dir/ibstream.toml` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ibstream.toml");
        self.save(&path);
        path
    }

    /// Writes the file at `path`.
    pub fn save(&self, path: &Path) {
        std::fs::write(path, self.to_toml()).expect("the configuration file is written");
    }

    /// The file at `path`, to change and [`ConfigFile::save`] again (runs started after read
    /// the change).
    pub fn read(path: &Path) -> ConfigFile {
        let text = std::fs::read_to_string(path).expect("the configuration file is read");
        ConfigFile {
            table: text.parse().expect("the configuration file is TOML"),
        }
    }
}
