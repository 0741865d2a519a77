"""Prometheus metrics (GET /metrics, chat/metrics.py): who may read them, that they move
with what users do and agree with the usage records, the shipped rules, and a real
Prometheus scraping two workers (PostgreSQL + Redis configuration only)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db.models import Sum
from django.test import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

import chat.generation as gen
from chat.generation import frames
from chat.generation.runtime import Runtime
from chat.models import UsageRecord
from tests.conftest import session_cookie
from tests.eventually import eventually
from tests.live import ROOT, free_port

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "metrics-token-for-tests-0123456789"
# USD per 1M input, output, cached input tokens of the test upstream's model.
PRICES = {"test-model": [3, 15, 1]}
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
ANSWER = " ".join(f"token{i}" for i in range(200))
NAMES = (
    "chat_generations_started_total", "chat_generations_total", "chat_tokens_total",
    "chat_cost_usd_total", "chat_time_to_first_token_seconds",
    "chat_generation_duration_seconds", "chat_stop_to_upstream_close_seconds",
    "chat_delta_lag_seconds", "chat_tokens_saved_total", "chat_active_generations",
    "chat_websocket_connections", "chat_event_loop_lag_seconds",
    "chat_admission_refusals_total", "chat_provider_errors_total",
    "process_resident_memory_bytes",
)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, frozenset of label items): value}`` of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(scrape: dict, name: str, **labels) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, items), v in scrape.items() if n == name and wanted <= items)


async def scrape(token: str | None = TOKEN, *, scheme: str = "Bearer"):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return await AsyncClient().get("/metrics", headers=headers)


async def metrics_now() -> dict:
    response = await scrape()
    assert response.status_code == 200
    return samples(response.content.decode())


@pytest.fixture
def metrics_token(settings):
    """The token set, and the test upstream's model allowed (its own label) and priced."""
    settings.CHAT_METRICS_TOKEN = TOKEN
    settings.CHAT_MODELS = ["test-model"]
    settings.CHAT_MODEL_PRICES = {model: tuple(Decimal(p) for p in prices)
                                  for model, prices in PRICES.items()}
    return TOKEN


# --- who may read them ------------------------------------------------------------------
async def test_metrics_are_not_found_when_no_token_is_configured(settings):
    settings.CHAT_METRICS_TOKEN = ""
    for token in (None, "", "anything"):
        assert (await scrape(token)).status_code == 404


async def test_metrics_are_not_found_without_the_right_bearer_token(metrics_token):
    assert (await scrape(None)).status_code == 404
    assert (await scrape("wrong-token")).status_code == 404
    assert (await scrape(TOKEN[:-1])).status_code == 404
    assert (await scrape(TOKEN, scheme="Token")).status_code == 404
    assert (await scrape("été-not-ascii")).status_code == 404


async def test_the_right_bearer_token_gets_every_chat_metric_in_prometheus_format(metrics_token):
    response = await scrape(scheme="bearer")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(
        response.content.decode())}
    names |= {name + "_total" for name in names}
    missing = [name for name in NAMES if name not in names]
    assert not missing


# --- they follow what happens -----------------------------------------------------------
async def stopped_mid_answer(ws, upstream) -> None:
    """Ask for ANSWER on ``ws`` and stop it after a few deltas; it ends cancelled."""
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    await ws.send({"type": "message", "content": "Count"})
    await ws.receive_until(lambda f: f["type"] == "delta" and f["seq"] >= 3)
    await ws.send({"type": "stop"})
    end = await ws.receive_until(lambda f: f["type"] == "generation.end")
    assert end["status"] == "cancelled"


async def record_sums(**filters) -> dict:
    return await UsageRecord.objects.filter(**filters).aaggregate(
        completion=Sum("completion_tokens"), prompt=Sum("prompt_tokens"))


async def test_a_completed_and_a_stopped_answer_move_the_counters_as_their_usage_records_say(
    alice, upstream, connect, metrics_token
):
    before = await metrics_now()
    upstream.answer = "Hello there, how are you?"
    _, _, ws = await connect(alice)
    during = await metrics_now()
    assert total(during, "chat_websocket_connections") == total(
        before, "chat_websocket_connections") + 1
    await ws.send({"type": "message", "content": "Hi"})
    assert (await ws.receive_type("generation.end"))["status"] == "completed"

    await stopped_mid_answer(ws, upstream)
    await ws.close()

    after = await metrics_now()

    def moved(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    model = {"model": "test-model"}
    assert moved("chat_generations_started_total", **model) == 2
    assert moved("chat_generations_total", status="completed", finish_reason="stop") == 1
    assert moved("chat_generations_total", status="cancelled", finish_reason="cancelled") == 1
    sums = await record_sums()
    assert moved("chat_tokens_total", kind="completion", **model) == sums["completion"] > 0
    assert moved("chat_tokens_total", kind="prompt", **model) == sums["prompt"] > 0
    cost = sum([r.cost_usd async for r in UsageRecord.objects.all()])
    assert cost > 0
    assert moved("chat_cost_usd_total", **model) == pytest.approx(float(cost))
    assert moved("chat_time_to_first_token_seconds_count", **model) == 2
    assert moved("chat_generation_duration_seconds_count", status="cancelled") == 1
    assert moved("chat_stop_to_upstream_close_seconds_count") == 1
    assert moved("chat_delta_lag_seconds_count") > 0
    assert total(after, "chat_active_generations") == total(before, "chat_active_generations")
    assert total(after, "chat_websocket_connections") == total(
        before, "chat_websocket_connections")


async def test_a_provider_error_and_a_refused_start_are_counted(
    alice, bob, upstream, connect, metrics_token, settings
):
    before = await metrics_now()
    upstream.fault = "server_error"
    _, _, ws = await connect(alice)
    await ws.send({"type": "message", "content": "Hi"})
    end = await ws.receive_type("generation.end")
    assert end["status"] == "failed"

    upstream.fault = None
    upstream.answer = ANSWER
    upstream.tokens_per_second = 40
    # The failed run is forgotten a moment after its end frame (its publisher drains).
    assert await eventually(lambda: Runtime.current().count() == 0)
    settings.CHAT_MAX_STREAMS_PER_WORKER = 1
    await ws.send({"type": "message", "content": "Count"})
    await ws.receive_type("generation.start")
    _, _, other = await connect(bob)
    await other.send({"type": "message", "content": "Me too"})
    refused = await other.receive_type("error")
    assert refused["code"] == "overloaded"
    await ws.send({"type": "stop"})
    await ws.receive_type("generation.end")

    after = await metrics_now()
    assert total(after, "chat_provider_errors_total", model="test-model", kind="5xx") == total(
        before, "chat_provider_errors_total", model="test-model", kind="5xx") + 1
    assert total(after, "chat_generations_total", status="failed", finish_reason="error") == total(
        before, "chat_generations_total", status="failed", finish_reason="error") + 1
    assert total(after, "chat_admission_refusals_total", reason="streams") == total(
        before, "chat_admission_refusals_total", reason="streams") + 1


async def test_an_answer_the_provider_cuts_short_counts_as_a_dropped_stream(
    alice, upstream, connect, metrics_token
):
    # The body ends cleanly mid-answer: no finish_reason, no [DONE].
    before = await metrics_now()
    upstream.answer = ANSWER
    upstream.fault = "end_mid_stream"
    _, _, ws = await connect(alice)
    await ws.send({"type": "message", "content": "Hi"})
    end = await ws.receive_type("generation.end")
    assert end["status"] == "failed" and "before it was complete" in end["error"]
    after = await metrics_now()
    assert total(after, "chat_provider_errors_total", kind="dropped") == total(
        before, "chat_provider_errors_total", kind="dropped") + 1


async def test_an_automatic_stop_counts_the_tokens_it_saved(alice, upstream, connect,
                                                             metrics_token):
    before = await metrics_now()
    upstream.answer = ANSWER
    _, _, ws = await connect(alice)
    await ws.send({"type": "message", "content": "Count", "max_answer_tokens": 20})
    end = await ws.receive_type("generation.end")
    assert end["finish_reason"] == "cost_limit"
    record = await UsageRecord.objects.aget()
    saved = record.max_tokens - record.completion_tokens
    after = await metrics_now()
    assert total(after, "chat_tokens_saved_total", rule="cost_limit") - total(
        before, "chat_tokens_saved_total", rule="cost_limit") == saved > 0


# --- the shipped rules ------------------------------------------------------------------
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: scripts/services.sh installs Debian's prometheus"
    return path


def test_the_shipped_prometheus_rules_are_valid_and_their_alerts_fire_as_documented():
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        result = subprocess.run([promtool(), *command], capture_output=True, text=True,
                                timeout=60, cwd=RULES.parent)
        assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping two workers ---------------------------------------------
def postgres_and_redis() -> bool:
    engine = django_settings.DATABASES["default"]["ENGINE"]
    return "postgresql" in engine and bool(os.environ.get("REDIS_URL"))


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping ``target`` (host:port)
    every second with the bearer token; storage in a temporary directory."""

    def __init__(self, target: str, workdir: Path):
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: scripts/services.sh installs Debian's prometheus"
        self.port = free_port()
        config = workdir / "prometheus.yml"
        (workdir / "token").write_text(TOKEN)
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "chat", "metrics_path": "/metrics",
                "authorization": {"type": "Bearer",
                                  "credentials_file": str(workdir / "token")},
                "static_configs": [{"targets": [target]}],
            }],
        }))
        self.log_path = ROOT / "artifacts" / f"prometheus-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return json.loads(response.read())

    def query(self, expr: str) -> float | None:
        """The value of an instant query with one sample (None: no sample)."""
        result = self.get("/api/v1/query", query=expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def target_health(self) -> str:
        try:
            targets = self.get("/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            return "starting"
        return targets[0]["health"] if targets else "none"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


class Tab:
    """alice's WebSocket on a live worker."""

    def __init__(self, ws):
        self.ws = ws

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    async def receive_until(self, predicate, timeout: float = 30) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                if predicate(frame):
                    return frame

    async def answer(self, content: str, **extra) -> dict:
        """Send a message; its generation.end frame."""
        await self.send({"type": "message", "content": content, **extra})
        return await self.receive_until(lambda f: f["type"] == "generation.end")


async def open_tab(server, user) -> Tab:
    cookie = await sync_to_async(session_cookie)(user)
    ws = await websockets.connect(
        f"{server.ws_url}/ws/conversations/{uuid.uuid4()}/",
        additional_headers={"Cookie": cookie, "Origin": server.url})
    tab = Tab(ws)
    await tab.receive_until(lambda f: f["type"] == "state")
    return tab


@pytest.mark.multiprocess
@pytest.mark.skipif(not postgres_and_redis(),
                    reason="the PostgreSQL + Redis configuration runs it (two workers)")
async def test_prometheus_scraping_two_workers_sees_the_totals_the_database_records(
    alice, upstream, asgi_servers
):
    workdir = Path(tempfile.mkdtemp(prefix="chat-metrics-"))
    multiproc = workdir / "multiproc"
    multiproc.mkdir()
    env = {"REDIS_URL": os.environ["REDIS_URL"],
           "CHANNEL_PREFIX": f"mx{uuid.uuid4().hex[:10]}", "LOG_LEVEL": "WARNING",
           "CHAT_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
           "CHAT_MODEL_PRICES": json.dumps(PRICES)}
    a = asgi_servers(name="metrics-a", **env)
    b = asgi_servers(name="metrics-b", **env)
    # One target: any worker answers for both (multiprocess mode).
    prometheus = Prometheus(f"127.0.0.1:{a.port}", workdir)
    try:
        on_a, on_b = await open_tab(a, alice), await open_tab(b, alice)
        upstream.answer = "A short answer that completes."
        assert (await on_a.answer("Hi"))["status"] == "completed"
        assert (await on_b.answer("Hi"))["status"] == "completed"

        await stopped_mid_answer(on_b, upstream)

        upstream.tokens_per_second = 200
        capped = await open_tab(a, alice)  # the first message sets the conversation's cap
        automatic = await capped.answer("Count", max_answer_tokens=20)
        assert automatic["finish_reason"] == "cost_limit"

        upstream.fault = "drop_mid_stream"
        assert (await on_b.answer("Count"))["status"] == "failed"
        upstream.fault = None
        for tab in (on_a, on_b, capped):
            await tab.ws.close()

        records = UsageRecord.objects.all()
        sums = await records.aaggregate(completion=Sum("completion_tokens"),
                                        prompt=Sum("prompt_tokens"))
        cost = float(sum([r.cost_usd async for r in records]))
        saved = sum([r.max_tokens - r.completion_tokens
                     async for r in records.filter(finish_reason="cost_limit")])
        by_status = {status: await records.filter(status=status).acount()
                     for status in ("completed", "cancelled", "failed")}
        assert by_status == {"completed": 2, "cancelled": 2, "failed": 1}

        queries = {
            'sum(chat_tokens_total{kind="completion"})': sums["completion"],
            'sum(chat_tokens_total{kind="prompt"})': sums["prompt"],
            "sum(chat_generations_started_total)": 5,
            'sum(chat_generations_total{status="completed"})': by_status["completed"],
            'sum(chat_generations_total{status="cancelled"})': by_status["cancelled"],
            'sum(chat_generations_total{status="failed"})': by_status["failed"],
            'sum(chat_tokens_saved_total{rule="cost_limit"})': saved,
            'sum(chat_provider_errors_total{kind="dropped"})': 1,
            "sum(chat_stop_to_upstream_close_seconds_count)": 2,
        }

        async def scraped_totals():
            try:
                return {q: prometheus.query(q) for q in queries}
            except OSError:
                return {}

        async def agree():
            got = await scraped_totals()
            return got and all(got[q] == pytest.approx(v) for q, v in queries.items())

        assert await eventually(agree, timeout=60, interval=1), (
            f"Prometheus: {await scraped_totals()}, database: {queries}, "
            f"target: {prometheus.target_health()}, log: {prometheus.log_path}")
        cost_scraped = prometheus.query("sum(chat_cost_usd_total)")
        assert cost > 0
        assert cost_scraped == pytest.approx(cost, rel=1e-6)
        completion_query = 'sum(chat_tokens_total{kind="completion"})'
        print(f"\nPrometheus {completion_query} = {prometheus.query(completion_query):g}; "
              f"database Sum(UsageRecord.completion_tokens) = {sums['completion']}")
        # Both workers' process figures, each with its pid.
        assert prometheus.query("count(process_resident_memory_bytes)") == 2
        assert prometheus.query("sum(chat_websocket_connections)") == 0

        # A worker that exits takes its live gauges with it; its counters stay.
        b.stop()
        after_exit = await eventually(
            lambda: prometheus.query("count(process_resident_memory_bytes)") == 1,
            timeout=30, interval=1)
        assert after_exit
        assert prometheus.query('sum(chat_tokens_total{kind="completion"})') == sums[
            "completion"]
    finally:
        prometheus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_a_stop_from_another_worker_is_timed_from_its_request_not_its_arrival(
    alice, upstream, metrics_token
):
    # What another worker sends: the control message, with when the stop was asked for
    # (here 0.4 s ago: the time it spent reaching the run counts as the user waits it).
    before = await metrics_now()
    generation = await gen.start_generation(alice, uuid.uuid4(), "hi")
    await upstream.until(lambda: upstream.requests and upstream.requests[-1].chunks_written >= 2)
    await generation.layer.group_send(
        gen.control_group_name(generation.conversation_id),
        frames.stop_request(alice.id, "stop", at=time.time() - 0.4))
    assert (await asyncio.wait_for(generation.wait(), 5))["status"] == "cancelled"
    after = await metrics_now()

    def moved(name):
        return total(after, name) - total(before, name)

    assert moved("chat_stop_to_upstream_close_seconds_count") == 1
    assert 0.4 <= moved("chat_stop_to_upstream_close_seconds_sum") < 2
