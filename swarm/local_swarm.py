"""Start a whole swarm on this machine as real processes: a bootstrap peer and block servers.

Used by the demo command, the integration tests and the benchmarks. It runs whatever command
line it is given (e.g. `python manage.py`), so this module knows nothing of Django.
Every process gets its own process group, so stopping one stops what it started; its DHT process and
p2pd run in a session of their own and exit when it is gone (swarm.dht.OwnedDHT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ONLINE_MARK = "Server is ONLINE"
NETSIM_READY_MARK = "netsim listening on"  # swarm.netsim's READY_MARK (not imported: this module starts processes only)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SwarmProcess:
    """A child process whose combined output is collected (and optionally copied to a log file)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None,
        log_path: Path | None,
        stop_signal: int = signal.SIGINT,
    ):
        self.name = name
        self.stop_signal = stop_signal  # what interrupt() sends: the signal that stops this program gracefully
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

    def interrupt(self) -> None:
        """The stop signal (SIGINT unless set) to the main process, which shuts its children down gracefully."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)

    def stop(self, timeout: float = 20.0) -> int | None:
        """The stop signal to the main process (it shuts its children down gracefully), then SIGKILL the group."""
        if self.process.poll() is None:
            self.interrupt()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything it started, as if the machine died.

        Its DHT process and p2pd run in a session of their own (swarm.dht.OwnedDHT), out of reach of
        the group's signal; they are found and killed too, so that the peer is gone at once.
        """
        children = _descendants(self.pid)
        self.signal(signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()
            self._log = None


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_together(processes: Sequence[SwarmProcess], timeout: float) -> None:
    for process in processes:
        process.interrupt()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        process.kill()  # the group: helpers the main process left behind (p2pd, pool children)


class LocalSwarm:
    def __init__(self, command: Sequence[str], *, env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.command = list(command)
        self.env = env or {}
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: list[SwarmProcess] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: Sequence[str]) -> SwarmProcess:
        return self.spawn_command(name, [*self.command, *args])

    def spawn_command(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, stop_signal: int = signal.SIGINT
    ) -> SwarmProcess:
        """Start any other process (a web server, a worker) managed along with the swarm."""
        log = self.log_dir / f"{name}.log" if self.log_dir else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        process = SwarmProcess(name, argv, {**self.env, **(env or {})}, log, stop_signal)
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
        self,
        model: str,
        *extra: str,
        name: str | None = None,
        wait: bool = True,
        timeout: float = 180,
        link_delay: float | None = None,
        link_bandwidth: float | None = None,
    ) -> SwarmProcess:
        """A block server; with `link_delay` (seconds one way) it sits behind a swarm.netsim proxy process
        and announces only the proxy's address, as if it were that far from every other peer."""
        name = name or f"server{sum(p.name.startswith('server') for p in self.processes)}"
        addresses = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
        if link_delay is not None or link_bandwidth is not None:
            port = free_port()
            proxy_port = self.start_link_proxy(f"{name}-link", port, link_delay or 0.0, link_bandwidth)
            addresses = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
            addresses += ["--announce-maddrs", f"/ip4/127.0.0.1/tcp/{proxy_port}"]
        args = ["runblockserver", model, "--initial-peers", *self.initial_peers, *addresses, *extra]
        process = self._spawn(name, args)
        if wait:
            process.wait_until_online(timeout)
        return process

    def start_link_proxy(self, name: str, target_port: int, delay: float, bandwidth: float | None = None) -> int:
        """A swarm.netsim process forwarding a new local port to `target_port`; returns the new port."""
        argv = [sys.executable, "-m", "swarm.netsim", f"0:127.0.0.1:{target_port}", "--delay", str(delay)]
        if bandwidth is not None:
            argv += ["--bandwidth", str(bandwidth)]
        paths = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        process = self.spawn_command(name, argv, env={"PYTHONPATH": os.pathsep.join(filter(None, paths))})
        line = process.wait_for_line(lambda text: text.startswith(NETSIM_READY_MARK), timeout=30)
        return int(line.split()[len(NETSIM_READY_MARK.split())].rsplit(":", 1)[1])

    def close(self, timeout: float = 8.0) -> None:
        """Stop everything in about `timeout` seconds at most, in parallel: block servers are signaled
        first (they announce OFFLINE through the DHT, so the bootstrap peer and link proxies stop only
        after them), everything else at the same moment; what still runs at the deadline is killed."""
        servers = [p for p in self.processes if "runblockserver" in p.argv]
        last = [p for p in self.processes if "rundht" in p.argv or "swarm.netsim" in p.argv]
        others = [p for p in reversed(self.processes) if p not in servers and p not in last]
        _stop_together(servers + others, timeout)
        _stop_together(last, 2.0)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
