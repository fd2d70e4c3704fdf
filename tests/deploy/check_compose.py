"""Checks docker-compose.yml without a Docker engine: it validates against the Compose
Specification's JSON schema (vendored in tests/data), and what the project promises of it holds.
Prints one JSON line: the ibstream service's config file (host path) and environment, for the
Rust test to pass to `ibstream check --config-only`. Exits non-zero with the reasons otherwise.

The Kafka service must run the Apache Kafka version the tests run (tests/kafka/pom.xml) with
the single-node settings the tests' brokers start with (tests/kafka/single-node.properties).

usage: check_compose.py COMPOSE_FILE SCHEMA_FILE"""

import json
import os
import re
import sys

import jsonschema
import yaml

compose_path, schema_path = sys.argv[1], sys.argv[2]
with open(compose_path) as f:
    compose = yaml.safe_load(f)
with open(schema_path) as f:
    schema = json.load(f)
jsonschema.Draft7Validator(schema).validate(compose)

problems = []
services = compose["services"]
for name, service in services.items():
    image = service.get("image", "")
    tag = image.rsplit(":", 1)[1] if ":" in image else ""
    if not tag or tag == "latest":
        problems.append(f"{name}: image {image!r} is not pinned to a version")
    one_shot = service.get("restart") == "no" and "profiles" in service
    check = service.get("healthcheck", {}).get("test")
    if not check and not one_shot:
        problems.append(f"{name}: no healthcheck and not a one-shot")
    if check and "grep" not in " ".join(check):
        problems.append(f"{name}: the healthcheck looks at an exit code only, not at output")
    for port in service.get("ports", []):
        if not str(port).startswith("127.0.0.1:"):
            problems.append(f"{name}: port {port} is published beyond 127.0.0.1")
    for dependency, condition in (service.get("depends_on") or {}).items():
        if condition.get("condition") != "service_healthy":
            problems.append(f"{name}: depends on {dependency} without service_healthy")

kafka = services["kafka"]
if not kafka["image"].startswith("apache/kafka:"):
    problems.append("kafka: not Apache Kafka's official image")
env = {k: str(v) for k, v in kafka["environment"].items()}
tests_kafka = os.path.join(os.path.dirname(os.path.abspath(compose_path)), "tests", "kafka")
with open(os.path.join(tests_kafka, "pom.xml")) as f:
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", f.read()).group(1).strip()
if kafka["image"] != f"apache/kafka:{version}":
    problems.append(f"kafka: image {kafka['image']!r}, the tests run apache/kafka:{version} (tests/kafka/pom.xml)")
# The image maps KAFKA_A_B to the broker setting a.b.
single_node = {"KAFKA_PROCESS_ROLES": "broker,controller"}
with open(os.path.join(tests_kafka, "single-node.properties")) as f:
    for line in f:
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            single_node["KAFKA_" + key.strip().upper().replace(".", "_")] = value.strip()
for key, want in single_node.items():
    if env.get(key) != want:
        problems.append(f"kafka: {key} is {env.get(key)!r}, tests/kafka/single-node.properties has {want!r}")
for key in ["KAFKA_NODE_ID", "KAFKA_LISTENERS", "KAFKA_CONTROLLER_QUORUM_VOTERS", "CLUSTER_ID"]:
    if key not in env:
        problems.append(f"kafka: {key} missing")

ibstream = services["ibstream"]
if ibstream.get("command") != ["run"]:
    problems.append("ibstream: does not run `ibstream run`")
environment = {k: str(v) for k, v in ibstream.get("environment", {}).items()}
config_path = None
for volume in ibstream.get("volumes", []):
    source, target = volume.split(":")[:2]
    if target == environment.get("IBSTREAM_CONFIG"):
        config_path = source
if config_path is None:
    problems.append("ibstream: IBSTREAM_CONFIG is not a mounted file")
if not set(ibstream.get("secrets", [])) <= set(compose.get("secrets", {})):
    problems.append("ibstream: uses a secret compose does not define")
if not ibstream.get("read_only"):
    problems.append("ibstream: the root filesystem is not read-only")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(json.dumps({"config": config_path, "environment": environment}))
