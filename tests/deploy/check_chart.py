"""Renders and lints the Helm chart with Helm's own engine (helm-python-sdk bundles Helm's Go
SDK; no helm binary, no cluster) and checks what the chart promises. Prints one JSON line per
rendered values file – {"values", "toml"} – for the Rust test to pass the ConfigMap's TOML to
`ibstream check --config-only`. Exits non-zero with the reasons otherwise.

usage: check_chart.py CHART_DIR"""

import json
import re
import sys

import yaml
from helm_python import lint
from helm_python.chart import Chart
from yamllint import linter
from yamllint.config import YamlLintConfig

chart_dir = sys.argv[1]
chart = Chart.load(chart_dir)
problems = []
YAMLLINT = YamlLintConfig("""
extends: default
rules:
  line-length: disable
  document-start: disable
  comments: {min-spaces-from-content: 1}
  # Helm's toYaml writes block sequences unindented under their key.
  indentation: {spaces: consistent, indent-sequences: whatever}
""")


def render(values, name="ib"):
    rendered = chart.render(values, name=name, namespace="crm")
    objects = []
    for path, text in rendered.items():
        if not path.endswith(".yaml") or not text.strip():
            continue
        for problem in linter.run(text, YAMLLINT):
            problems.append(f"yamllint {path}:{problem.line}: {problem.desc}")
        objects.extend(o for o in yaml.safe_load_all(text) if o)
    return objects, rendered


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def check_common(label, objects, values_secret):
    kinds = {o["kind"] for o in objects}
    for kind in ["ConfigMap", "Deployment", "Service", "ServiceAccount"]:
        if kind not in kinds:
            problems.append(f"{label}: no {kind}")
    deployment = by_kind(objects, "Deployment")[0]
    spec = deployment["spec"]
    if spec["replicas"] != 1 or spec["strategy"]["type"] != "Recreate":
        problems.append(f"{label}: not one replica with the Recreate strategy")
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    probes = {p: container[p]["httpGet"]["path"] for p in ["startupProbe", "livenessProbe", "readinessProbe"]}
    if probes != {"startupProbe": "/health/ready", "livenessProbe": "/health/live", "readinessProbe": "/health/ready"}:
        problems.append(f"{label}: probes {probes}")
    sc = container["securityContext"]
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"] and sc.get("runAsNonRoot")):
        problems.append(f"{label}: container security context {sc}")
    psc = pod["securityContext"]
    if not (psc.get("runAsNonRoot") and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
        problems.append(f"{label}: pod security context {psc}")
    secret_volumes = [v for v in pod["volumes"] if "secret" in v and v["name"] == "credentials"]
    if not secret_volumes or secret_volumes[0]["secret"]["secretName"] != values_secret:
        problems.append(f"{label}: credentials are not mounted from {values_secret}")
    if "checksum/config" not in spec["template"]["metadata"].get("annotations", {}):
        problems.append(f"{label}: no config checksum annotation")
    config = by_kind(objects, "ConfigMap")[0]["data"]["ibstream.toml"]
    # Credentials are files, never values.
    for line in config.splitlines():
        key = line.split("=")[0].strip()
        if key in ("password", "api_key", "sasl_password"):
            problems.append(f"{label}: a credential value in the ConfigMap: {line}")
    return config, secret_volumes[0]["secret"]["items"] if secret_volumes else []


out = []
objects, rendered = render({})
config, items = check_common("default values", objects, "ibstream-credentials")
if "password_file = \"/etc/ibstream/secrets/crm-password\"" not in config:
    problems.append("default values: crm.password_file does not point at the mounted secret")
if "NOTES.txt" not in " ".join(rendered) or "/status" not in next(v for k, v in rendered.items() if k.endswith("NOTES.txt")):
    problems.append("NOTES.txt does not tell how to watch /status")
out.append({"values": "default", "toml": config})

with open(f"{chart_dir}/ci/everything-values.yaml") as f:
    everything = yaml.safe_load(f)
objects, _ = render(everything)
config, items = check_common("everything", objects, "ibstream-credentials")
kinds = {o["kind"] for o in objects}
for kind in ["ServiceMonitor", "PodDisruptionBudget"]:
    if kind not in kinds:
        problems.append(f"everything: no {kind}")
dashboards = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"]
if not dashboards:
    problems.append("everything: no dashboard ConfigMap labelled grafana_dashboard: \"1\"")
else:
    json.loads(dashboards[0]["data"]["ibstream.json"])
keys = {i["key"] for i in items}
if keys != {"crm-password", "crm-api-key", "kafka-sasl-password", "registry-password"}:
    problems.append(f"everything: secret keys mounted {keys}")
for want in ['sasl_password_file = "/etc/ibstream/secrets/kafka-sasl-password"',
             'password_file = "/etc/ibstream/secrets/registry-password"']:
    if want not in config:
        problems.append(f"everything: {want} missing from the ConfigMap")
out.append({"values": "everything", "toml": config})

# Without existingSecret the chart refuses to render, naming it.
try:
    chart.render({"existingSecret": ""}, name="ib", namespace="crm")
    problems.append("values without existingSecret rendered")
except Exception as error:  # helm_python raises HelmRenderError
    if "existingSecret" not in str(error):
        problems.append(f"the error without existingSecret does not name it: {error}")

# A credential put in `config` by mistake is refused, naming the key, never the value: it
# would land in the ConfigMap in plain text.
SECRET = "chart-secret-Qx7-3391"
for section, key in [("crm", "password"), ("crm", "api_key"), ("kafka", "sasl_password"),
                     ("schema_registry", "password")]:
    values = {"config": {section: {key: SECRET}}}
    if section == "schema_registry":
        values["config"][section]["url"] = "http://registry:8081"
    try:
        rendered = chart.render(values, name="ib", namespace="crm")
        problems.append(f"config.{section}.{key} as a value rendered")
        if any(SECRET in text for text in rendered.values()):
            problems.append(f"config.{section}.{key}: the secret is in the rendered objects")
    except Exception as error:
        if f"config.{section}.{key}" not in str(error):
            problems.append(f"the error of config.{section}.{key} does not name it: {error}")
        if SECRET in str(error):
            problems.append(f"the error of config.{section}.{key} shows the secret")

# Helm's own linter, strict.
for label, values in [("default", {}), ("everything", everything)]:
    result = lint(chart_dir, values, strict=True)
    # Helm's severities: 1 info, 2 warning, 3 error; strict mode fails on warnings.
    messages = [m for m in result.get("messages", []) if m.get("severity", 0) >= 2]
    if result.get("errors") or messages:
        problems.append(f"helm lint --strict ({label}): {json.dumps(result)}")

# The chart README documents every values key.
with open(f"{chart_dir}/values.yaml") as f:
    values = yaml.safe_load(f)
with open(f"{chart_dir}/README.md") as f:
    readme = f.read()


def leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "config" and not path.startswith(("resources", "podSecurityContext", "containerSecurityContext")):
            yield from leaves(value, f"{path}.")
        else:
            yield path


for path in leaves(values):
    if f"`{path}`" not in readme:
        problems.append(f"helm/ibstream/README.md does not document `{path}`")
# Every value has a `# --` comment in values.yaml (a section's own keys; whole blocks such as
# `config` or `resources` are documented as one).
WHOLE = ("config", "resources", "podSecurityContext", "containerSecurityContext")
section = None
lines = open(f"{chart_dir}/values.yaml").read().splitlines()
for i, line in enumerate(lines):
    m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_]*):(.*)$", line)
    if not m:
        continue
    indent, key, rest = m.groups()
    if not indent:
        section = key
    elif section in WHOLE:
        continue
    if not rest.strip() and not indent and key not in WHOLE:
        continue  # a section heading; its keys carry the comments
    above = i - 1
    comment = []
    while above >= 0 and lines[above].strip().startswith("#"):
        comment.append(lines[above].strip())
        above -= 1
    if not any(c.startswith("# --") for c in comment):
        problems.append(f"values.yaml:{i + 1}: `{key}` has no `# --` comment")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
for line in out:
    print(json.dumps(line))
