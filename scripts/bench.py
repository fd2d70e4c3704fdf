"""The end-to-end benchmark of `ibstream run` (see scripts/bench.sh, which builds the binary
and calls this).

Starts the simulator (fixed seed, no background changes) and a broker – tansu (memory storage)
by default, or Apache Kafka (the version of tests/kafka/pom.xml, one KRaft node, its log on
disk) – runs `ibstream run` (at-least-once unless told) until every stream's backfill is complete – read from /status,
never a sleep – and reports records/s, the connector's CPU microseconds per record (user+sys of
the ibstream process alone, from /proc), its peak RSS, the CRM requests and the bytes produced.

Then the same workload through the baseline (benches/baseline/poller.py: what a team writes
without ibstream) on the same simulator and broker, checks both emitted the same number of
events per stream, and prints the ratio.

usage: bench.py BINARY BASELINE_PYTHON [--smoke] [--scale F] [--no-baseline] [--verify]
                [--rate-limited MS [--rps N] [--sim-rps N]]
                [--broker tansu|apache] [--delivery at-least-once|exactly-once]

--scale F: F times the full workload (0.1 for the 10 % scaling figure);
--no-baseline: ibstream alone (for profiling and quick comparisons of ibstream builds);
--broker apache: Apache Kafka from target/kafka/libs (./scripts/test.sh fetches it) with the
  single-node settings of tests/kafka/single-node.properties;
--delivery exactly-once: ibstream with Kafka transactions (needs --broker apache);
--verify: after the backfill, `ibstream verify` of the whole range three times (no baseline):
  its wall time (median of 3) against the backfill's, its CPU, peak RSS and CRM pages, and
  that it found the topics equal (exit 0);
--rate-limited MS: the CRM's rate limit, not the connector, bounds the backfill: the simulator
  answers every call after MS milliseconds and at most --sim-rps calls a second (default 25,
  HTTP 429 beyond), ibstream runs at crm.requests_per_second = --rps (default 20, below the
  simulator's limit), on 3 live servers at --scale 0.1 unless given; no baseline. Prints the
  elapsed time of the backfill, the bound (CRM requests / --rps: the least time any connector
  can take), their ratio, the simulator's 429 answers, and checks the events against the
  simulator's truth (one CREATED event per entity).
environment BENCH_PERF=FILE: `perf record -g` of the connector during the backfill into FILE."""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BINARY = sys.argv[1]
BASELINE_PYTHON = sys.argv[2]
SMOKE = "--smoke" in sys.argv
SCALE = float(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 1.0
RATE_LIMITED = int(sys.argv[sys.argv.index("--rate-limited") + 1]) if "--rate-limited" in sys.argv else None
RPS = int(sys.argv[sys.argv.index("--rps") + 1]) if "--rps" in sys.argv else 20
SIM_RPS = int(sys.argv[sys.argv.index("--sim-rps") + 1]) if "--sim-rps" in sys.argv else 25
if RATE_LIMITED is not None and "--scale" not in sys.argv:
    SCALE = 0.1
VERIFY = "--verify" in sys.argv
BASELINE = "--no-baseline" not in sys.argv and RATE_LIMITED is None and not VERIFY


def option(name, default, allowed):
    value = sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
    if value not in allowed:
        sys.exit(f"bench: {name} is {value!r}; one of {', '.join(allowed)}")
    return value


BROKER = option("--broker", "tansu", ("tansu", "apache"))
DELIVERY = option("--delivery", "at-least-once", ("at-least-once", "exactly-once"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (
    {"leads": 2000, "customers": 800, "transactions": 5000, "positions": 10000, "servers": 2}
    if SMOKE
    else {"leads": round(200000 * SCALE), "customers": round(100000 * SCALE),
          "transactions": round(500000 * SCALE), "positions": round(1000000 * SCALE),
          "servers": 3 if RATE_LIMITED is not None else 5}
)
SIM_FLAGS = [] if RATE_LIMITED is None else [f"--latency-ms={RATE_LIMITED}", f"--max-rps={SIM_RPS}"]
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(what, check, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"bench: {what} did not happen within {timeout} s")
        time.sleep(0.2)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def figures(records, seconds, cpu, rss):
    """The figures both sides report."""
    return {
        "records": records,
        "seconds": round(seconds, 2),
        "records_per_second": round(records / seconds),
        "cpu_us_per_record": round(cpu * 1e6 / max(records, 1), 2),
        "peak_rss_mb": round(rss / 2**20, 1),
    }


def start_apache_kafka(work, port):
    """Formats a KRaft storage folder under `work` and starts one broker+controller node on
    `port` (its controller on a second free port); returns the process once it serves."""
    with open(os.path.join(ROOT, "tests/kafka/pom.xml")) as f:
        version = f.read().split("<kafka.version>")[1].split("<")[0].strip()
    libs = os.path.join(ROOT, "target/kafka/libs")
    if not os.path.exists(os.path.join(libs, f"kafka_2.13-{version}.jar")):
        sys.exit(f"bench: no Apache Kafka {version} in {libs}; ./scripts/test.sh fetches it")
    controller = free_port()
    with open(os.path.join(ROOT, "tests/kafka/single-node.properties")) as f:
        single_node = f.read()
    properties = os.path.join(work, "server.properties")
    with open(properties, "w") as f:
        f.write(f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={work}/kafka-logs
""" + single_node)
    java = ["java", "-cp", os.path.join(libs, "*"),
            f"-Dlog4j2.configurationFile={ROOT}/tests/kafka/log4j2.properties"]
    # As Kafka's Uuid.randomUuid(): an id starting with "-" would be read as an option.
    cluster = "-"
    while cluster.startswith("-"):
        cluster = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    subprocess.run(java + ["kafka.tools.StorageTool", "format", "--cluster-id", cluster, "--config", properties],
                   check=True, stdout=subprocess.DEVNULL)
    log = open(os.path.join(work, "kafka.log"), "w")
    kafka = subprocess.Popen(java[:1] + ["-Xms1g", "-Xmx1g"] + java[1:] + ["kafka.Kafka", properties],
                             stdout=log, stderr=subprocess.STDOUT)

    def serving():
        with open(os.path.join(work, "kafka.log")) as f:
            return "Kafka Server started" in f.read()
    wait_for("Apache Kafka", serving, 120)
    return kafka


def verify(config, run_seconds):
    """`ibstream verify` of the whole range, three times: each run's wall time, CPU and
    peak RSS (from wait4), the median against the backfill's time, and its verdict."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    runs = []
    for _ in range(3):
        started = time.monotonic()
        with tempfile.TemporaryFile() as out:
            process = subprocess.Popen(
                [BINARY, "--config", config, "verify", "--from", "2024-01-01", "--to", today, "--format", "json"],
                env={**os.environ, "IBSTREAM_LOG": "warn"}, stdout=out)
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.monotonic() - started
            out.seek(0)
            report = json.loads(out.read())
        code = os.waitstatus_to_exitcode(status)
        runs.append({"seconds": round(seconds, 2), "exit": code,
                     "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
                     "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                     "crm_pages": sum(s["pages"] for s in report["streams"]),
                     "crm_records": sum(s["crmRecords"] for s in report["streams"]),
                     "kafka_events": sum(s["kafkaEvents"] for s in report["streams"]),
                     "equal": report["equal"]})
        print(json.dumps({"verify_run": runs[-1]}), flush=True)
    median = sorted(r["seconds"] for r in runs)[1]
    print(json.dumps({"verify": {"seconds_median": median, "run_backfill_seconds": round(run_seconds, 2),
                                 "ratio_to_run": round(median / run_seconds, 2),
                                 "all_equal": all(r["equal"] and r["exit"] == 0 for r in runs)}}), flush=True)


def main():
    work = tempfile.mkdtemp(prefix="ibstream-bench-")
    sim_port, kafka_port, http_port = free_port(), free_port(), free_port()
    processes = []
    try:
        started = time.monotonic()
        sim = subprocess.Popen(
            [BINARY, "sim", "--listen", f"127.0.0.1:{sim_port}", "--seed", "42", "--start-date", "2024-01-01"]
            + [f"--{k}={v}" for k, v in SIZES.items()] + SIM_FLAGS,
            stdout=subprocess.DEVNULL,
        )
        processes.append(sim)
        if BROKER == "apache":
            kafka = start_apache_kafka(work, kafka_port)
        else:
            kafka = subprocess.Popen(
                ["tansu", "broker", "--listener-url", f"tcp://127.0.0.1:{kafka_port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}", "--storage-engine", "memory://tansu/"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        processes.append(kafka)
        wait_for("the simulator", lambda: get_json(f"http://127.0.0.1:{sim_port}/_sim/stats"), 300)
        print(f"simulator ready in {time.monotonic() - started:.1f} s ({SIZES}; broker {BROKER}, {DELIVERY})",
              flush=True)
        config = os.path.join(work, "ibstream.toml")
        with open(config, "w") as f:
            f.write(f"""
[crm]
base_url = "http://127.0.0.1:{sim_port}"
email = "ib@example.com"
password = "ib-secret"
api_key = "sim-api-key"
domain = "sim.example.com"
requests_per_second = {RPS if RATE_LIMITED is not None else 1000}

[kafka]
bootstrap_servers = "127.0.0.1:{kafka_port}"
delivery = "{DELIVERY}"
instance_id = "bench"
replication_factor = 1

[topics]
prefix = "bench"

[http]
listen = "127.0.0.1:{http_port}"

[streams]
start_date = "2024-01-01"
""" + os.environ.get("BENCH_EXTRA_TOML", ""))
        run_started = time.monotonic()
        others_before = cpu_seconds(sim.pid), cpu_seconds(kafka.pid)
        run = subprocess.Popen([BINARY, "--config", config, "run"],
                               env={**os.environ, "IBSTREAM_LOG": "warn"}, stdout=subprocess.DEVNULL)
        processes.append(run)
        # When the CRM saw the run's first request (its login) and its first data request,
        # from the start of the process, read from the simulator every 2 ms.
        first_request = first_data = None
        while first_data is None and time.monotonic() - run_started < 60:
            try:
                stats = get_json(f"http://127.0.0.1:{sim_port}/_sim/stats")
            except OSError:
                stats = {"requests": 0}
            elapsed_ms = round((time.monotonic() - run_started) * 1000)
            if first_request is None and stats["requests"] > 0:
                first_request = elapsed_ms
            # Requests are counted as they arrive: the login, then the first data call.
            if stats["requests"] >= 2:
                first_data = elapsed_ms
            time.sleep(0.002)
        # BENCH_PERF=FILE: profile the connector (perf record, call graphs) until the backfill ends.
        perf = None
        if os.environ.get("BENCH_PERF"):
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", os.environ["BENCH_PERF"],
                                     "-p", str(run.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        live = SIZES["servers"]
        # When each poller's backfill completed (seconds from the start): the last one bounds
        # the records/s.
        finished = {}

        def done():
            status = get_json(f"http://127.0.0.1:{http_port}/status")
            pollers = status["pollers"]
            for p in pollers:
                name = p["stream"] + (f"/{p['serverTag']}" if p.get("serverTag") else "")
                if p["backfillProgress"] == 1 and p["lastSuccess"] and name not in finished:
                    finished[name] = round(time.monotonic() - run_started, 1)
            tags = [p for p in pollers if p["stream"] == "positions"]
            if len(tags) < live or len(pollers) < 4 + live:
                return None
            if all(p["backfillProgress"] == 1 and p["lastSuccess"] for p in pollers):
                return status
            return None

        status = wait_for("the backfill", done, 3600)
        elapsed = time.monotonic() - run_started
        cpu = cpu_seconds(run.pid)
        rss = peak_rss_bytes(run.pid)
        # What else used the 2 cores meanwhile: what bounds the throughput.
        sim_cpu = cpu_seconds(sim.pid) - others_before[0]
        broker_cpu = cpu_seconds(kafka.pid) - others_before[1]
        if perf:
            perf.send_signal(2)
            perf.wait(timeout=60)
        records = sum(c["created"] for c in status["counts"].values())
        requests = get_json(f"http://127.0.0.1:{sim_port}/_sim/stats")["requests"]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics") as response:
            metrics = response.read().decode()
        def metric(name):
            """The sum of a metric's series (every label set)."""
            values = [float(line.split()[-1]) for line in metrics.splitlines()
                      if line.split(" ")[0].split("{")[0] == name]
            if not values:
                sys.exit(f"bench: no metric {name} on /metrics")
            return sum(values)
        events = sum(c["created"] + c["updated"] for c in status["counts"].values())
        result = {**figures(records, elapsed, cpu, rss), "crm_requests": requests,
                  "bytes_produced": int(metric("ibstream_sink_bytes_total")),
                  "state_records_per_event": round(metric("ibstream_sink_state_records_total") / events, 3),
                  "state_bytes_per_event": round(metric("ibstream_sink_state_bytes_total") / events, 1),
                  "cores_busy": {"ibstream": round(cpu / elapsed, 2), "simulator": round(sim_cpu / elapsed, 2),
                                 "broker": round(broker_cpu / elapsed, 2)},
                  # Where a poller's time goes: one CRM request, one batch into Kafka (means).
                  "crm_request_ms": round(1000 * metric("ibstream_crm_request_duration_seconds_sum")
                                          / metric("ibstream_crm_request_duration_seconds_count"), 2),
                  "batch_commit_ms": round(1000 * metric("ibstream_sink_batch_duration_seconds_sum")
                                           / metric("ibstream_sink_batch_duration_seconds_count"), 2),
                  "backfill_seconds": dict(sorted(finished.items(), key=lambda kv: kv[1])),
                  # From the start of the process (the simulator's latency included).
                  "first_crm_request_ms": first_request, "first_data_request_ms": first_data}
        print(json.dumps({"ibstream": result}), flush=True)
        if RATE_LIMITED is not None:
            sim_stats = get_json(f"http://127.0.0.1:{sim_port}/_sim/stats")
            # Fake transactions are not asked for (crm.include_fake_transactions is off).
            truth = {stream: sum(1 for r in get_json(f"http://127.0.0.1:{sim_port}/_sim/truth/{stream}", timeout=120)
                                 if not (stream == "transactions" and r.get("isFake") is True))
                     for stream in status["counts"]}
            created = {name: c["created"] for name, c in status["counts"].items()}
            bound = requests / RPS
            print(json.dumps({"rate_limited": {
                "latency_ms": RATE_LIMITED, "requests_per_second": RPS, "simulator_max_rps": SIM_RPS,
                "records": records, "crm_requests": requests, "elapsed_seconds": round(elapsed, 1),
                "bound_seconds": round(bound, 1), "ratio": round(elapsed / bound, 2),
                "simulator_429s": sim_stats["rateLimited"],
                "updated_events": sum(c["updated"] for c in status["counts"].values()),
                "created_per_stream": created, "truth_per_stream": truth,
                "same_as_truth": created == truth}}), flush=True)
        run.terminate()
        run.wait(timeout=15)
        if VERIFY:
            verify(config, elapsed)
        if not BASELINE:
            return

        # The same workload through the baseline, on the same simulator and broker.
        root = ROOT
        baseline_started = time.monotonic()
        baseline = subprocess.Popen(
            [BASELINE_PYTHON, os.path.join(root, "benches/baseline/poller.py"),
             "--crm", f"http://127.0.0.1:{sim_port}", "--kafka", f"127.0.0.1:{kafka_port}",
             "--schemas", os.path.join(root, "schemas"), "--prefix", "baseline", "--start-date", "2024-01-01"],
            stdout=subprocess.PIPE, text=True,
        )
        processes.append(baseline)
        peak = 0
        cpu_base = 0.0
        while baseline.poll() is None:
            try:
                peak = max(peak, peak_rss_bytes(baseline.pid))
                cpu_base = cpu_seconds(baseline.pid)
            except OSError:
                pass
            time.sleep(0.2)
        output = baseline.stdout.read()
        if baseline.returncode != 0:
            sys.exit(f"bench: the baseline failed ({baseline.returncode})")
        base_elapsed = time.monotonic() - baseline_started
        counts = json.loads(output.strip().splitlines()[-1])["events"]
        ours = {name: c["created"] + c["updated"] for name, c in status["counts"].items()}
        if counts != ours:
            sys.exit(f"bench: the baseline emitted {counts}, ibstream {ours}: not the same work")
        base = figures(sum(counts.values()), base_elapsed, cpu_base, peak)
        print(json.dumps({"baseline": base}), flush=True)
        print(json.dumps({
            "ratio_records_per_second": round(result["records_per_second"] / base["records_per_second"], 1),
            "ratio_cpu_per_record": round(base["cpu_us_per_record"] / result["cpu_us_per_record"], 1),
            "same_events_per_stream": True,
        }), flush=True)
    finally:
        for p in reversed(processes):
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


main()
