"""Parses Prometheus/OpenMetrics text from stdin with prometheus_client's own parser and
prints one JSON line per sample: {"family", "type", "name", "labels", "value"}.

An independent parser: if ibstream wrote anything a Prometheus server could not read, this
fails instead of printing."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({
            "family": family.name,
            "type": family.type,
            "name": sample.name,
            "labels": sample.labels,
            "value": sample.value,
        }))
