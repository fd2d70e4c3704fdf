"""Decodes ibstream's Avro bytes with fastavro, an independent Avro implementation.

usage: read_avro.py SCHEMA_DIR DATA_DIR

SCHEMA_DIR holds the project's .avsc files (shared types in files of their own, inlined here
at their first use, independently of ibstream's own composition); DATA_DIR
holds <EventName>.<n>.bin files, each one framed event (single-object encoding). Prints one
JSON line per file: {"file", "fingerprint" (hex of CRC-64-AVRO of the parsing canonical form,
little-endian, as fastavro computes it), "header" (hex of bytes 2..10), "record"}.
"""
import datetime
import decimal
import io
import json
import os
import sys

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
SHARED = ["EventMeta", "TradingAccount", "UtmDetails", "TagCategory"]


def plain(value):
    if isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    if isinstance(value, datetime.datetime):
        return {"millis": (value - EPOCH) // datetime.timedelta(milliseconds=1)}
    if isinstance(value, datetime.date):
        return {"date": value.isoformat()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return value


def inline(node, shared, defined):
    """Replaces references to the shared types by their definitions, the first time only."""
    if isinstance(node, str):
        short = node.rsplit(".", 1)[-1]
        if short in shared and short not in defined:
            return inline(json.loads(json.dumps(shared[short])), shared, defined)
        return node
    if isinstance(node, list):
        return [inline(n, shared, defined) for n in node]
    if isinstance(node, dict):
        node = dict(node)
        if node.get("type") in ("record", "enum", "fixed"):
            defined.add(node["name"])
        if node.get("type") == "record":
            node["fields"] = [dict(f, type=inline(f["type"], shared, defined)) for f in node["fields"]]
        for key in ("items", "values"):
            if key in node:
                node[key] = inline(node[key], shared, defined)
        if isinstance(node.get("type"), (dict, list)):
            node["type"] = inline(node["type"], shared, defined)
        return node
    return node


def main():
    schema_dir, data_dir = sys.argv[1], sys.argv[2]
    shared = {}
    for name in SHARED:
        with open(os.path.join(schema_dir, name + ".avsc")) as f:
            shared[name] = json.load(f)
    parsed = {}
    for file in sorted(os.listdir(data_dir)):
        event = file.split(".")[0]
        if event not in parsed:
            with open(os.path.join(schema_dir, event + ".avsc")) as f:
                parsed[event] = parse_schema(inline(json.load(f), shared, set()))
        schema = parsed[event]
        with open(os.path.join(data_dir, file), "rb") as f:
            data = f.read()
        assert data[:2] == b"\xc3\x01", f"{file}: not single-object encoding"
        record = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
        pcf = to_parsing_canonical_form(schema)
        print(json.dumps({
            "file": file,
            "fingerprint": fingerprint(pcf, "CRC-64-AVRO"),
            "header": data[2:10].hex(),
            "record": plain(record),
        }))


if __name__ == "__main__":
    main()
