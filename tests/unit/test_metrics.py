"""Metrics: one registry per app, real HELP text, real engine errors, valid for promtool.

The module fixture runs a real app (MemoryEngine, served over loopback) through
a few jobs, one of them through an injected engine error, and keeps what
``GET /metrics`` answered: counters and histograms then have samples, which is
what promtool and a scraper really see.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_kit import WAIT_S, Served, served
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from actors.engine.base import (
    Conflict,
    ContainerMissing,
    ContainerSpec,
    Engine,
    EngineError,
    EngineUnavailable,
    ImageMissing,
    RegistryUnavailable,
)
from actors.engine.memory import MemoryEngine, MemoryRegistry
from actors.metrics import ENGINE_ERROR_KINDS, MeteredEngine, Metrics, engine_error_kind

README = Path(__file__).resolve().parents[2] / "README.md"
# Injected into create_container before one job: the Spawner retries them.
INJECTED_UNAVAILABLE = 2


@dataclass(frozen=True)
class Scrape:
    status: int
    content_type: str
    text: str
    families: dict[str, Any]

    def sample(self, name: str, **labels: str) -> float:
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise KeyError(f"{name}{labels} is not in the scrape")


def _request(live: Served, method: str, path: str, body: object = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", live.server.port, timeout=WAIT_S)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def _run(live: Served, **job: Any) -> str:
    status, _, body = _request(live, "POST", "/jobs", {"project": "p", **job})
    assert status == 201, body
    job_id = str(json.loads(body)["id"])
    live.app.wait(job_id, WAIT_S)
    return job_id


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    with served(tmp_path_factory.mktemp("metrics")) as live:
        _run(live, work_item="a")  # from the base image, committed
        _run(live, work_item="a")  # from its snapshot
        _run(live, work_item="b", command=["sh", "-c", "exit 3"])  # fails, never committed
        live.engine.fail_next(
            "create_container",
            times=INJECTED_UNAVAILABLE,
            error=EngineUnavailable("injected: a 500 from the daemon"),
        )
        _run(live, work_item="c")  # retried through the blips
        status, ctype, body = _request(live, "GET", "/metrics")
    text = body.decode()
    return Scrape(status, ctype, text, {f.name: f for f in text_string_to_metric_families(text)})


def test_promtool_accepts_the_metrics_of_a_running_app(scrape: Scrape) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is missing: `make test` installs it (config/engine.sh, Debian's "
            "prometheus package), or run: apt-get install prometheus",
            pytrace=False,
        )
    assert scrape.status == 200
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape.text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_metrics_are_prometheus_clients_exposition(scrape: Scrape) -> None:
    assert scrape.content_type == CONTENT_TYPE_LATEST
    assert scrape.sample("snapyard_spawn_seconds_count") == 4
    assert scrape.sample("snapyard_snapshot_hits_total") == 1
    assert scrape.sample("snapyard_snapshot_misses_total") == 3
    assert scrape.sample("snapyard_jobs", state="succeeded") == 3
    assert scrape.sample("snapyard_jobs", state="failed") == 1
    assert scrape.sample("snapyard_api_requests_total", route="/jobs", method="POST") == 4


def test_engine_errors_total_counts_the_errors_the_engine_really_raised(scrape: Scrape) -> None:
    """Regression: snapyard_engine_errors_total was declared and documented, never incremented."""
    assert scrape.sample("snapyard_engine_errors_total", kind="unavailable") == (
        INJECTED_UNAVAILABLE
    )
    # Every kind is exported from the start, so a rate() has a series to work on.
    for kind in ENGINE_ERROR_KINDS:
        scrape.sample("snapyard_engine_errors_total", kind=kind)


def _readme_metrics() -> dict[str, tuple[list[str], str, str]]:
    """The README's Metrics table: exposed name -> (labels, type, meaning)."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[list[str], str, str]] = {}
    for line in section.splitlines():
        match = re.match(r"^\| `(snapyard_[a-z_]+)(?:\{([a-z_,]*)\})?` \| (\w+) \| (.+) \|$", line)
        if match:
            name, labels, kind, meaning = match.groups()
            rows[name] = ((labels or "").split(",") if labels else [], kind, meaning)
    return rows


def test_every_metric_has_real_help_and_a_readme_row_with_its_type_and_labels(
    scrape: Scrape,
) -> None:
    """Regression: five metrics were emitted undeclared, with HELP "Snapyard metric <name>"."""
    rows = _readme_metrics()
    exported = {
        name: family
        for name, family in scrape.families.items()
        if not name.endswith("_created")  # prometheus-client's creation timestamps
    }
    assert len(exported) == 13
    for name, family in exported.items():
        assert len(family.documentation) > 30, name
        assert not family.documentation.startswith("Snapyard metric"), name
        shown = f"{name}_total" if family.type == "counter" else name
        assert shown in rows, f"{shown} is missing from the README's Metrics table"
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        documented_labels, kind, meaning = rows[shown]
        assert sorted(documented_labels) == sorted(labels), shown
        assert kind == family.type, shown
        assert len(meaning) > 20, shown
    assert set(rows) == {f"{n}_total" if f.type == "counter" else n for n, f in exported.items()}


# --- the registry is the app's ---------------------------------------------------


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics.unscraped(), Metrics.unscraped()
    first.snapshot_hits.inc()
    assert first.value("snapyard_snapshot_hits_total") == 1
    assert second.value("snapyard_snapshot_hits_total") == 0


def test_value_refuses_a_name_no_metric_exposes() -> None:
    metrics = Metrics.unscraped()
    assert metrics.value("snapyard_jobs", state="queued") == 0
    assert metrics.value("snapyard_spawn_seconds_count") == 0
    with pytest.raises(KeyError, match="snapyard_snapshot_hit_total"):
        metrics.value("snapyard_snapshot_hit_total")


def test_two_apps_in_one_process_keep_their_own_metrics_and_secrets(tmp_path: Path) -> None:
    with served(tmp_path / "one") as one, served(tmp_path / "two") as two:
        _run(one, work_item="x")
        assert one.app.metrics.value("snapyard_spawn_seconds_count") == 1
        assert two.app.metrics.value("snapyard_spawn_seconds_count") == 0
        assert one.app.metrics.registry is not two.app.metrics.registry
        assert one.app.secrets is not two.app.secrets


# --- MeteredEngine: the one place engine errors are counted -----------------------


def test_metered_engine_counts_each_error_once_by_kind_and_reraises_it() -> None:
    inner = MemoryEngine()
    base = inner.add_worker_image("w:1")
    metrics = Metrics.unscraped()
    engine = MeteredEngine(inner, metrics)
    injected = ImageMissing("sha256:gone")
    inner.fail_next("create_container", error=injected)
    with pytest.raises(ImageMissing) as raised:
        engine.create_container(ContainerSpec(image="sha256:gone"))
    assert raised.value is not injected  # MemoryEngine raises a copy; same type and text
    with pytest.raises(ContainerMissing):
        engine.remove_container("nope")
    cid = engine.create_container(ContainerSpec(image=base))
    with pytest.raises(Conflict):
        engine.remove_image(base)
    engine.remove_container(cid)
    inner.set_unavailable(True)
    with pytest.raises(EngineUnavailable):
        engine.ping()
    counts = {k: metrics.value("snapyard_engine_errors_total", kind=k) for k in ENGINE_ERROR_KINDS}
    assert counts == {
        "registry_unavailable": 0,
        "unavailable": 1,
        "image_missing": 1,
        "container_missing": 1,
        "conflict": 1,
        "other": 0,
    }


def test_metered_engine_counts_a_broken_event_stream() -> None:
    inner = MemoryEngine()
    metrics = Metrics.unscraped()
    stream = MeteredEngine(inner, metrics).events()
    inner.set_unavailable(True)  # pushes the error into the open stream
    with pytest.raises(EngineUnavailable):
        list(stream)
    stream.close()
    assert metrics.value("snapyard_engine_errors_total", kind="unavailable") == 1


def test_metered_engine_is_a_whole_engine() -> None:
    """A method added to the protocol but not to the wrapper would bypass the count."""
    engine = MeteredEngine(MemoryEngine(), Metrics.unscraped())
    assert isinstance(engine, Engine)
    protocol = {n for n in vars(Engine) if not n.startswith("_")}
    assert protocol <= set(vars(MeteredEngine))


def test_metered_engine_counts_a_registry_that_is_down_apart_from_the_engine() -> None:
    registry = MemoryRegistry("127.0.0.1:5000")
    inner = MemoryEngine(registry=registry)
    base = inner.add_worker_image("w:1")
    metrics = Metrics.unscraped()
    engine = MeteredEngine(inner, metrics)
    reference = engine.push_image(base, "127.0.0.1:5000/snap/x")
    assert engine.pull_image(reference) == base
    registry.set_unavailable(True)
    with pytest.raises(RegistryUnavailable):
        engine.push_image(base, "127.0.0.1:5000/snap/x")
    with pytest.raises(RegistryUnavailable):
        engine.pull_image(reference)
    assert metrics.value("snapyard_engine_errors_total", kind="registry_unavailable") == 2
    assert metrics.value("snapyard_engine_errors_total", kind="unavailable") == 0


def test_error_kinds_follow_the_engine_error_types() -> None:
    assert engine_error_kind(RegistryUnavailable("127.0.0.1:5000", "refused")) == (
        "registry_unavailable"
    )
    assert engine_error_kind(EngineUnavailable("down")) == "unavailable"
    assert engine_error_kind(ImageMissing("x")) == "image_missing"
    assert engine_error_kind(ContainerMissing("x")) == "container_missing"
    assert engine_error_kind(Conflict("in use")) == "conflict"
    assert engine_error_kind(EngineError("build failed")) == "other"
