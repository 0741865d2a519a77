"""Live ASGI server processes for tests that need a real server: daphne in a
subprocess on a free loopback port, on the test database, optionally several of them
(multi-process tests) sharing one Redis channel layer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_env() -> dict[str, str]:
    """Environment that points a subprocess at the database the tests use now."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return {"SQLITE_PATH": str(db["NAME"]), "DATABASE_URL": ""}
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return {"DATABASE_URL": f"postgres://{user}@{host}:{port}/{db['NAME']}"}


class LiveServer:
    """``python -m chatproject.server chatproject.asgi:application`` (daphne with flow
    control) on 127.0.0.1:<free port>.

    ``env`` adds/overrides environment variables (OPENAI_BASE_URL of the test upstream,
    REDIS_URL, ...). Its output goes to ``log_path``.
    """

    def __init__(self, env: dict[str, str] | None = None, *, name: str = "live"):
        self.port = free_port()
        self.name = name
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatproject.settings",
            "PYTHONUNBUFFERED": "1",
            "DEBUG": "1",
            **test_database_env(),
            **(env or {}),
        }
        if settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer"):
            self.env.setdefault("REDIS_URL", "")
        self.log_path = ROOT / "artifacts" / f"{name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> LiveServer:
        self.log_path.parent.mkdir(exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chatproject.server", "-b", "127.0.0.1", "-p", str(self.port),
             "chatproject.asgi:application"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen in {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
