"""The baseline: the poller a competent team writes without ibstream, for scripts/bench.sh.

The same work as `ibstream run`'s backfill: log in, read every stream in the same 31-day
windows with pageSize 1000 and paging by `total` (positions per live server tag), keep a
fingerprint per entity in a dict (canonical JSON, 64-bit hash) so a changed record is an
UPDATED event and an unchanged one is dropped, encode each event with fastavro from the same
.avsc files (single-object encoding, as ibstream without a registry), and produce with
confluent-kafka (idempotent, batching, linger.ms). It leaves out what it does not need for the
comparison: dead letters, the state topic, restarts; customers' trading accounts are not parsed
from "User additional ID" (an empty array) – all of which only flatters the baseline.

usage: poller.py --crm URL --kafka BOOTSTRAP --schemas DIR --prefix PREFIX --start-date DAY
Prints one JSON line: events by stream, seconds."""

import argparse
import datetime
import decimal
import hashlib
import io
import json
import os
import time

import fastavro
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

STREAMS = [
    # stream, endpoint, date filter, key field, event schema
    ("leads", "leads", "registrationDate", "id", "LeadEvent"),
    ("customers", "registrations", "registrationDate", "customerId", "CustomerEvent"),
    ("transactions", "transactions", "transactionDate", "id", "TransactionEvent"),
]
SHARED = ["EventMeta", "TradingAccount", "UtmDetails", "TagCategory"]
UTC = datetime.timezone.utc


def load_schemas(directory):
    named = {}
    for name in SHARED:
        with open(os.path.join(directory, name + ".avsc")) as f:
            parse_schema(json.load(f), named_schemas=named)
    schemas = {}
    for event in ["LeadEvent", "CustomerEvent", "TransactionEvent", "ServerEvent", "PositionEvent"]:
        with open(os.path.join(directory, event + ".avsc")) as f:
            schema = parse_schema(json.load(f), named_schemas=named)
        header = b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
        schemas[event] = (schema, header)
    return schemas


def timestamp(value):
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value / 1000, UTC)
    text = str(value).replace("T", " ")
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d"):
        try:
            return datetime.datetime.strptime(text[:26], fmt).replace(tzinfo=UTC)
        except ValueError:
            pass
    return None


def convert(value, schema):
    """Converts a JSON value to what fastavro writes for `schema` (a union's non-null branch)."""
    if value is None:
        return None
    if isinstance(schema, list):
        branch = next(s for s in schema if s != "null")
        return convert(value, branch)
    if isinstance(schema, dict):
        logical = schema.get("logicalType")
        if logical == "timestamp-millis":
            return timestamp(value)
        if logical == "decimal":
            return decimal.Decimal(str(value)).quantize(decimal.Decimal(1).scaleb(-schema["scale"]))
        kind = schema.get("type")
        if kind == "record":
            if not isinstance(value, dict):
                return None
            return {f["name"]: convert(value.get(f["name"]), f["type"]) for f in schema["fields"]}
        if kind == "array":
            return [convert(v, schema["items"]) for v in value] if isinstance(value, list) else []
        if kind == "map":
            return {k: str(v) for k, v in value.items()} if isinstance(value, dict) else {}
        return convert(value, kind)
    if schema == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if schema in ("long", "int"):
        return int(value)
    if schema == "boolean":
        return bool(value)
    return value


def event(record, schema, op, event_id, endpoint):
    now = datetime.datetime.now(UTC)
    fields = {}
    known = set()
    for field in schema["fields"]:
        name = field["name"]
        known.add(name)
        if name == "meta":
            fields[name] = {
                "eventId": event_id, "op": op, "emittedAt": now, "source": "sim.example.com",
                "endpoint": endpoint, "windowFrom": None, "windowTo": None, "fetchedAt": now,
                "connectorVersion": "baseline",
            }
        elif name == "extra":
            continue
        elif name == "accounts":
            fields[name] = []
        else:
            try:
                fields[name] = convert(record.get(name), field["type"])
            except (ValueError, TypeError, decimal.InvalidOperation, StopIteration):
                fields[name] = None
    fields["extra"] = {k: json.dumps(v) for k, v in record.items() if k not in known}
    return fields


def main():
    parser = argparse.ArgumentParser()
    for flag in ["--crm", "--kafka", "--schemas", "--prefix", "--start-date"]:
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    schemas = load_schemas(args.schemas)
    http = requests.Session()
    headers = {"X-Api-Key": "sim-api-key", "X-DOMAIN": "sim.example.com"}
    token = http.post(f"{args.crm}/api/v1/auth/login", headers=headers, timeout=30, json={
        "email": "ib@example.com", "password": "ib-secret", "rememberMe": True}).json()["token"]
    headers["X-Auth-Token"] = token
    admin = AdminClient({"bootstrap.servers": args.kafka})
    topics = [f"{args.prefix}.{s}" for s in ["leads", "customers", "transactions", "servers", "positions"]]
    for future in admin.create_topics([NewTopic(t, 3, 1) for t in topics]).values():
        try:
            future.result()
        except Exception as error:  # an existing topic is fine
            if "already exists" not in str(error).lower():
                raise
    producer = Producer({
        "bootstrap.servers": args.kafka, "enable.idempotence": True, "linger.ms": 20,
        "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
    })
    fingerprints = {}
    counts = {}
    started = time.monotonic()
    buffer = io.BytesIO()

    def emit(stream, key, record, schema_name, endpoint):
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
        fp = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
        previous = fingerprints.get((stream, key))
        if previous == fp:
            return
        fingerprints[(stream, key)] = fp
        op = "CREATED" if previous is None else "UPDATED"
        event_id = hashlib.blake2b(f"{stream}\0{key}\0{previous}\0{fp}".encode(), digest_size=8).hexdigest()
        schema, header = schemas[schema_name]
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schema, event(record, schema, op, event_id, endpoint))
        while True:
            try:
                producer.produce(f"{args.prefix}.{stream}", key=key.encode(), value=header + buffer.getvalue())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        counts[stream] = counts.get(stream, 0) + 1

    def windows():
        day = datetime.date.fromisoformat(args.start_date)
        today = datetime.datetime.now(UTC).date()
        while day <= today:
            end = min(day + datetime.timedelta(days=30), today)
            yield day, end
            day = end + datetime.timedelta(days=1)

    def read(stream, endpoint, date_filter, key_field, schema_name, extra=None, key_prefix=""):
        url = f"{args.crm}/api/v1/ib/{endpoint}"
        for start, end in windows():
            page, last = 1, 1
            while page <= last:
                params = {f"{date_filter}From": start.isoformat(), f"{date_filter}To": end.isoformat(),
                          "page": page, "pageSize": 1000, **(extra or {})}
                answer = http.get(url, params=params, headers=headers, timeout=60).json()
                last = max(1, -(-int(answer.get("total", 0)) // 1000))
                for record in answer.get("data", []):
                    key = key_prefix + str(record[key_field])
                    emit(stream, key, record, schema_name, f"/api/v1/ib/{endpoint}")
                page += 1

    for stream in STREAMS:
        read(*stream)
    servers = http.get(f"{args.crm}/api/v1/ib/servers", headers=headers, timeout=60).json()
    live = []
    for platform, group in servers.items():
        for server in group:
            server.setdefault("platform", platform)
            emit("servers", server["id"], server, "ServerEvent", "/api/v1/ib/servers")
            if server.get("type") == "live":
                live.append(server["id"])
    for tag in live:
        # Keyed as ibstream keys positions: serverTag:positionId.
        read("positions", "positions", "positionCloseDate", "positionId", "PositionEvent",
             extra={"serverTag": tag}, key_prefix=f"{tag}:")
    producer.flush(120)
    print(json.dumps({"events": counts, "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main()
