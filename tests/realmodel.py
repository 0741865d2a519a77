"""A real inference engine for the ``realmodel`` tests: llama.cpp's ``llama-server``
serving SmolLM2-135M-Instruct on CPU.

``scripts/realmodel.sh`` builds the server and unpacks the model into a cache outside
the checkout (about 15 minutes on 2 cores the first time, then a second); nothing is
downloaded while the tests run. :class:`LlamaServer` starts it on a free loopback port
and reads the engine's own numbers: ``llamacpp:tokens_predicted_total`` from
``/metrics`` (every generated token, cancelled requests included) and token counts
from ``/tokenize`` (the model's tokenizer, not tiktoken).

Tests marked ``realmodel`` are skipped unless ``REALMODEL=1`` or ``--realmodel``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.live import ROOT, free_port

# The engine is on loopback: never route its requests through an HTTP proxy of the
# environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Every figure a test measured, printed in pytest's terminal summary (tests/conftest.py)
# so a CI log shows them without ``-s``: (test name, {figure: value}).
FIGURES: list[tuple[str, dict]] = []

REQUESTED_HELP = "set REALMODEL=1 or pass --realmodel (the first run builds llama-server)"


def requested(config) -> bool:
    """True when the realmodel tests should run: ``REALMODEL=1`` or ``--realmodel``."""
    return os.environ.get("REALMODEL", "").strip() == "1" or config.getoption("realmodel")


class RealModelUnavailable(RuntimeError):
    """scripts/realmodel.sh failed (no compiler, no package index, ...); the message
    ends with the tail of its output."""


def build() -> tuple[Path, Path]:
    """Paths of the llama-server binary and the GGUF model.

    ``LLAMA_SERVER`` and ``REALMODEL_GGUF`` in the environment are used when both are
    set; otherwise scripts/realmodel.sh provides them (building on the first call;
    the script holds a lock, so concurrent callers wait for one build).
    Raises RealModelUnavailable when the script fails. The script's pip is this
    interpreter's (the virtualenv has pip; a bare Debian python3 may not).
    """
    server, gguf = os.environ.get("LLAMA_SERVER"), os.environ.get("REALMODEL_GGUF")
    if server and gguf:
        return Path(server), Path(gguf)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "realmodel.sh")],
        capture_output=True, text=True, env={"PYTHON": sys.executable, **os.environ},
    )
    if result.returncode != 0:
        raise RealModelUnavailable(
            f"scripts/realmodel.sh exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    paths = dict(
        line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
    )
    return Path(paths["LLAMA_SERVER"]), Path(paths["REALMODEL_GGUF"])


@dataclass
class LlamaServer:
    """``llama-server -m <gguf> --host 127.0.0.1 --port <free>``, one slot (``-np 1``),
    an 8192-token context, ``/metrics`` and ``/slots`` enabled, no web UI.

    One thread (``REALMODEL_THREADS``): ggml's threads meet at a spinning barrier after
    every operation, so on a loaded 2-core machine (CI, other test processes) ``-t 2``
    decoded 2 tokens/s where ``-t 1`` decoded 25-30.

    All helpers are synchronous HTTP calls with short timeouts; from async tests call
    them through ``asyncio.to_thread`` while the app streams in the same event loop.
    """

    binary: Path
    gguf: Path
    port: int = field(default_factory=free_port)
    threads: int = field(default_factory=lambda: int(os.environ.get("REALMODEL_THREADS", "1")))
    context: int = 8192
    process: subprocess.Popen | None = None
    model: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OPENAI_BASE_URL of the engine's OpenAI-compatible API."""
        return f"{self.url}/v1"

    @property
    def log_path(self) -> Path:
        return ROOT / "artifacts" / f"llama-server-{self.port}.log"

    def start(self, timeout: float = 120) -> LlamaServer:
        """Start the engine and wait until ``GET /health`` answers 200 (model loaded).
        Raises RuntimeError with the end of its log if it exits or is not ready in
        ``timeout`` seconds."""
        self.log_path.parent.mkdir(exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1",
                "--port", str(self.port), "-np", "1", "-c", str(self.context),
                "-t", str(self.threads), "--metrics", "--slots", "--no-webui",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited {self.process.returncode}: {self.log()[-3000:]}"
                )
            try:
                if self._get("/health", timeout=1).get("status") == "ok":
                    self.model = self._get("/v1/models")["data"][0]["id"]
                    return self
            except OSError:
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server not healthy in {timeout}s: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the engine's numbers ----------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"llamacpp:tokens_predicted_total": 123.0, ...}``."""
        with _opener.open(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][\w:]*)\s+(\S+)$", line)
            if match:
                values[match[1]] = float(match[2])
        return values

    def busy(self) -> bool:
        """True while a slot is processing a request (``GET /slots``)."""
        return any(slot.get("is_processing") for slot in self._get("/slots"))

    def tokens_predicted(self, timeout: float = 10) -> int:
        """``llamacpp:tokens_predicted_total`` once the engine is idle.

        The counter grows only when a slot is released (the run ended, or the engine
        noticed its client left), so this waits until no slot is processing and two
        reads agree. Raises TimeoutError if the engine is still busy after ``timeout``
        seconds (it did not notice a closed connection)."""
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline:
            if not self.busy():
                value = int(self.metrics()["llamacpp:tokens_predicted_total"])
                if value == previous:
                    return value
                previous = value
            time.sleep(0.05)
        raise TimeoutError(f"llama-server still generating {timeout}s later")

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the model's tokenizer (``POST /tokenize``, no BOS)."""
        return len(self._post("/tokenize", {"content": text})["tokens"])

    def count_prompt_tokens(self, messages: list[dict]) -> int:
        """Tokens of a chat prompt as the engine builds it: its chat template applied
        (``POST /apply-template``) then tokenized with special tokens parsed."""
        prompt = self._post("/apply-template", {"messages": messages})["prompt"]
        tokens = self._post(
            "/tokenize", {"content": prompt, "add_special": True, "parse_special": True}
        )["tokens"]
        return len(tokens)

    # -- HTTP ----------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 5):
        with _opener.open(f"{self.url}{path}", timeout=timeout) as response:
            return json.load(response)

    def _post(self, path: str, body: dict, timeout: float = 5):
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with _opener.open(request, timeout=timeout) as response:
            return json.load(response)
