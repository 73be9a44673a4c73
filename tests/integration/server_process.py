"""The enrollment server as its own processes, for integration tests (not a test module).

`Server(root, broker_url, site)` writes a server config (SQLite in `root` unless `database` names another one,
e.g. a PostgreSQL URL; `database_options` and `mqtt` add settings such as `busy_timeout_s` or `shared_group`)
and drives the server through its CLI (`cli("init")`, `cli("import", ...)`) and `serve`: `start()` waits for
/healthz, `stop()` sends SIGTERM, `kill()` SIGKILL (no clean stop: a crash). A server can be started again after
either, with the same config and database; its log goes on in `root/server.log`. `store` opens the server's
database for the test to read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import free_port
from waiting import wait_until

from enrollment_server.store import Store, StoredEvent

TOKEN = "agent-e2e-admin-token-0123456789"
SERVER_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 180.0


class Server:
    def __init__(
        self,
        root: Path,
        broker_url: str,
        site: str,
        *,
        database: str | None = None,
        database_options: Mapping[str, Any] | None = None,
        mqtt: Mapping[str, Any] | None = None,
        client_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """`extra`: more server.yaml sections (merged over the ones written here)."""
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.site = site
        self.database = database or str(root / "server.db")
        self.key = root / "keys" / "gallery.pem"
        self.public_key = root / "keys" / "gallery.pub.pem"
        self.port = free_port()
        self.config = root / "server.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "site": site,
                    "database": {"url": self.database, **(database_options or {})},
                    "mqtt": {"url": broker_url, "client_id": client_id or f"e2e-server-{self.port}", **(mqtt or {})},
                    "gallery": {"signing_key": str(self.key)},
                    "api": {"host": "127.0.0.1", "port": self.port},
                    **(extra or {}),
                }
            )
        )
        self.log = root / "server.log"
        self.env = {**os.environ, "FACEATTEND_ADMIN_TOKEN": TOKEN}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self._store: Store | None = None

    # CLI commands (each its own process, as an admin runs them)
    def cli(self, *args: str, ok: Sequence[int] = (0,)) -> list[dict[str, Any]]:
        cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
        assert r.returncode in ok, f"{' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        out = []
        for line in r.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def start(self, *, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), "serve"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        assert wait_until(self._healthy, timeout=SERVER_START_TIMEOUT_S, interval=0.2), self.log_tail()

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> dict[str, Any]:
        return self.http.get("/healthz").json()["components"]

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean stop, nothing flushed, no DISCONNECT."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int | None:
        """SIGTERM and wait (a clean stop); the exit code, None when it was not running."""
        if not self.running:
            return None
        assert self.proc is not None
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def close(self) -> None:
        self.http.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        self.stop()

    # what the server stored
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.database)
        return self._store

    def events(self, device: str) -> list[StoredEvent]:
        return self.store.events(device_id=device)

    def latest_version(self, site: str) -> int:
        latest = self.store.latest_gallery_version(site)
        return 0 if latest is None else latest.version
