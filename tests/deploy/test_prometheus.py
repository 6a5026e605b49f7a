"""Metrics to decisions, against the real thing: a real Prometheus scraping a real
`enginehouse serve` under a load of known rate. The rules check and pass their unit tests;
the autoscalers' exact queries, every recording rule and every dashboard panel return data;
the request rate Prometheus computes agrees with the load that was driven."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from make_repository import make_repository

from enginehouse.testing import ServerProcess, free_port
from tests.deploy.conftest import DEPLOY, tool

yaml = pytest.importorskip("yaml")  # the deploy extra's; skipped without it (the default run)

RATE = 40.0  # requests per second the load sends
LOAD_S = 30.0
LABELS = {"namespace": "enginehouse", "pod": "enginehouse-0"}
BODY = json.dumps(
    {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
            {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
        ]
    }
).encode()


def test_rules_check_and_pass_their_unit_tests() -> None:
    promtool = tool("promtool")
    rules = DEPLOY / "prometheus"
    subprocess.run([promtool, "check", "rules", str(rules / "rules.yaml")], check=True)
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"], cwd=rules, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """A real Prometheus on a free loopback port, scraping one server every second, with the
    bundle's rules evaluated every second."""

    def __init__(self, folder: Path, metrics_port: int) -> None:
        rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        (folder / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(folder / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "enginehouse",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{metrics_port}"], "labels": LABELS}
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "prometheus.log", "wb"),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr, "time": f"{at:.3f}"}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def drive(port: int, rate: float, seconds: float, sent: list[float]) -> None:
    """``rate`` inferences a second for ``seconds``, paced; the wall time of each is kept."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        connection.request("POST", "/v2/models/simple/infer", body=BODY)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        sent.append(time.time())
    connection.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, list[float]]]:
    folder = tmp_path_factory.mktemp("prometheus")
    repository = make_repository(folder / "repo", with_torch=False)
    with ServerProcess([repository], log_path=folder / "server.log") as server:
        server.wait_ready()
        prometheus = Prometheus(folder, server.metrics_port)
        try:
            time.sleep(3)  # a few scrapes of the idle server first
            sent: list[float] = []
            load = threading.Thread(target=drive, args=(server.http_port, RATE, LOAD_S, sent))
            load.start()
            load.join()
            time.sleep(3)  # the last scrapes and rule evaluations
            yield prometheus, sent
        finally:
            prometheus.stop()


def _present(prometheus: Prometheus, expr: str, at: float) -> list[dict[str, Any]]:
    result = prometheus.query(expr, at)
    assert result, f"no data for {expr}"
    return result


def test_request_rate_agrees_with_the_load(scraped: tuple[Prometheus, list[float]]) -> None:
    prometheus, sent = scraped
    end = sent[-1]
    # The dashboard's request-rate query, over a window inside the load.
    panel = 'sum(rate(nv_inference_request_success{model="simple"}[10s]))'
    measured = float(_present(prometheus, panel, end - 1)[0]["value"][1])
    assert abs(measured - RATE) / RATE < 0.2, measured
    # The recording rule: requests sent in the minute before, per second.
    window = [t for t in sent if end - 60 <= t <= end]
    expected = len(window) / 60
    rule = 'enginehouse:request_rate:rate1m{model="simple"}'
    recorded = float(_present(prometheus, rule, end)[0]["value"][1])
    assert abs(recorded - expected) / expected < 0.2, (recorded, expected)


def test_autoscaler_queries_return_data(scraped: tuple[Prometheus, list[float]]) -> None:
    prometheus, sent = scraped
    at = sent[-1]
    scaled = next(
        d
        for d in yaml.safe_load_all(
            (DEPLOY / "kubernetes" / "base" / "scaledobject.yaml").read_text()
        )
        if d
    )
    for trigger in scaled["spec"]["triggers"]:
        _present(prometheus, trigger["metadata"]["query"], at)
    adapter = yaml.safe_load(
        (DEPLOY / "kubernetes" / "overlays" / "hpa" / "prometheus-adapter-rules.yaml").read_text()
    )
    rules = yaml.safe_load(adapter["data"]["config.yaml"])
    for rule, group_by in [(r, "pod") for r in rules["rules"]] + [
        (r, "namespace") for r in rules["externalRules"]
    ]:
        query = (
            rule["metricsQuery"]
            .replace("<<.LabelMatchers>>", 'namespace="enginehouse"')
            .replace("<<.GroupBy>>", group_by)
        )
        _present(prometheus, query, at)


def test_every_recording_rule_returns_data(scraped: tuple[Prometheus, list[float]]) -> None:
    prometheus, sent = scraped
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
    recorded = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    assert len(recorded) >= 8
    for name in recorded:
        _present(prometheus, name, sent[-1])


def test_every_dashboard_panel_returns_data(scraped: tuple[Prometheus, list[float]]) -> None:
    prometheus, sent = scraped
    dashboard = json.loads((DEPLOY / "grafana" / "enginehouse.json").read_text())
    has_gpu = bool(prometheus.query("nv_gpu_utilization", sent[-1]))
    checked = 0
    for panel in dashboard["panels"]:
        if panel["description"].startswith("GPU:") and not has_gpu:
            continue  # no GPU on this machine: those panels are empty by design
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$model", ".*")
                .replace("$__rate_interval", "15s")
                .replace("$__range", "5m")
            )
            _present(prometheus, expr, sent[-1])
            checked += 1
    assert checked >= 12
