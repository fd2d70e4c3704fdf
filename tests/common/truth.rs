//! The events the simulator's truth should become: each record read as `ibstream` reads a
//! page (`read_record`, UTC), then encoded to its Avro value – one definition for every suite
//! that checks topics against the truth.

use std::collections::HashMap;

use apache_avro::types::Value as Avro;
use chrono_tz::Tz;
use ibstream::crm::page::read_record;
use ibstream::crm::{CrmRecord, Customer, Lead, Position, Server, Transaction};
use ibstream::events::{to_value, AvroEvent, EventMeta};
use ibstream::sim::{Kind, SimHandle};
use serde_json::Value as Json;

/// The Avro value (with [`EventMeta::blank`] as `meta`) of each truth record of `stream`, by
/// the record's Kafka key. Left out, as `ibstream` leaves them out of the data topics:
/// malformed records (they go to the dead-letter topic) and fake (test) transactions.
pub fn expected_values(sim: &SimHandle, stream: &str) -> HashMap<String, Avro> {
    fn build<T: CrmRecord + AvroEvent>(
        truth: Vec<Json>,
        key: impl Fn(&T) -> String,
    ) -> HashMap<String, Avro> {
        let meta = EventMeta::blank();
        truth
            .into_iter()
            .filter_map(|json| read_record::<T>(json, Tz::UTC).ok())
            .map(|record| {
                let value = to_value(&record.model, &meta).expect("a read record encodes");
                (key(&record.model), value)
            })
            .collect()
    }
    match stream {
        "leads" => build::<Lead>(sim.truth(Kind::Leads), |m| m.id.unwrap().to_string()),
        "customers" => build::<Customer>(sim.truth(Kind::Customers), |m| {
            m.customer_id.unwrap().to_string()
        }),
        "transactions" => build::<Transaction>(
            sim.truth(Kind::Transactions)
                .into_iter()
                .filter(|t| t["isFake"] == false)
                .collect(),
            |m| m.id.unwrap().to_string(),
        ),
        "servers" => build::<Server>(sim.truth(Kind::Servers), |m| m.id.clone().unwrap()),
        "positions" => build::<Position>(sim.truth(Kind::Positions), |m| {
            format!(
                "{}:{}",
                m.server_tag.clone().unwrap(),
                m.position_id.unwrap()
            )
        }),
        other => panic!("no stream {other}"),
    }
}

/// The expected event body (the fields of [`without_meta`]) of each truth record of `stream`,
/// by key.
pub fn expected(sim: &SimHandle, stream: &str) -> HashMap<String, Vec<(String, Avro)>> {
    expected_values(sim, stream)
        .into_iter()
        .map(|(key, value)| (key, without_meta(&value)))
        .collect()
}

/// The fields of an event but `meta` and `balanceUsd` (a customer's balance, which moves
/// with every transaction without making an event, by design).
pub fn without_meta(record: &Avro) -> Vec<(String, Avro)> {
    match record {
        Avro::Record(fields) => fields
            .iter()
            .filter(|(n, _)| n != "meta" && n != "balanceUsd")
            .cloned()
            .collect(),
        other => panic!("not a record: {other:?}"),
    }
}
