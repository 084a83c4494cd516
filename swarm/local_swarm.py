"""Start a whole swarm on this machine as real processes: a bootstrap peer and block servers.

Used by the demo command, the integration tests and the benchmarks. It runs whatever command
line it is given (e.g. `python manage.py`), so this module knows nothing of Django.
Every process gets its own process group, so stopping one also stops its DHT child and p2pd.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ONLINE_MARK = "Server is ONLINE"


class SwarmProcess:
    """A child process whose combined output is collected (and optionally copied to a log file)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None, log_path: Path | None):
        self.name = name
        self.argv = list(argv)
        self.lines: list[str] = []
        self.peer_id: str | None = None  # block servers: known once ONLINE
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 (closed in kill())
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        threading.Thread(target=self._collect, name=f"{name}-output", daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            if self._log:
                self._log.write(line)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, predicate, timeout: float) -> str:
        """The first output line satisfying `predicate`; raises if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.process.poll() is not None and seen == len(self.lines):
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-3000:]}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} did not get ready in {timeout:.0f} s:\n{self.output()[-3000:]}")
                self._changed.wait(min(remaining, 0.5))

    def wait_until_online(self, timeout: float = 180) -> str:
        """Wait for a block server's ONLINE log line; returns (and remembers) its peer id."""
        line = self.wait_for_line(lambda text: ONLINE_MARK in text, timeout=timeout)
        self.peer_id = line.rsplit("peer id", 1)[-1].strip()
        return self.peer_id

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT to the main process (it shuts its children down gracefully), then SIGKILL the group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, as if the machine died."""
        self.signal(signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()
            self._log = None


class LocalSwarm:
    def __init__(self, command: Sequence[str], *, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.command = list(command)
        self.env = env or {}
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: list[SwarmProcess] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: Sequence[str]) -> SwarmProcess:
        return self.spawn_command(name, [*self.command, *args])

    def spawn_command(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> SwarmProcess:
        """Start any other process (a web server, a worker) managed along with the swarm."""
        log = self.log_dir / f"{name}.log" if self.log_dir else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        process = SwarmProcess(name, argv, {**self.env, **(env or {})}, log)
        self.processes.append(process)
        return process

    def start_dht(self, host: str = "127.0.0.1", port: int = 0, identity_path: str | None = None) -> list[str]:
        args = ["rundht", "--host-maddrs", f"/ip4/{host}/tcp/{port}"]
        if identity_path:
            args += ["--identity-path", identity_path]
        process = self._spawn("dht", args)
        first = process.wait_for_line(lambda line: line.startswith("/ip4/") and "/p2p/" in line, timeout=60)
        self.initial_peers = [first.strip()]
        return self.initial_peers

    def start_server(
        self, model: str, *extra: str, name: str | None = None, wait: bool = True, timeout: float = 180
    ) -> SwarmProcess:
        name = name or f"server{sum(p.name.startswith('server') for p in self.processes)}"
        args = [
            "runblockserver",
            model,
            "--initial-peers",
            *self.initial_peers,
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            *extra,
        ]
        process = self._spawn(name, args)
        if wait:
            process.wait_until_online(timeout)
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
