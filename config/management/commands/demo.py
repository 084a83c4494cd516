"""`manage.py demo`: the whole local swarm and the site, as real processes, in one command."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from transformers import AutoConfig

from config.celery import app as celery_app
from swarm.local_swarm import LocalSwarm
from swarm.models.registry import dht_prefix_for

# The block servers: (model option, blocks, public name). The Llama is split in two spans so that
# inference hops between servers; the MoE model fits one server.
SERVERS = (("model", "0:4", "demo-1"), ("model", "4:8", "demo-2"), ("moe_model", "0:8", "demo-moe"))
# Ctrl-C stops everything at once; what has not exited after this many seconds is killed (the bootstrap peer,
# stopped after the servers' OFFLINE announcements, gets up to 2 s more): the demo is gone in under 10 s.
STOP_TIMEOUT = 6.0


def model_prefix(path: str) -> str:
    """The DHT prefix a server of this checkpoint announces (its model page's address)."""
    return dht_prefix_for(path, AutoConfig.from_pretrained(path).model_type)


class Command(BaseCommand):
    help = "Run a bootstrap DHT peer, block servers on both demo models, Celery worker and beat, and the site."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address of the site and the swarm")
        parser.add_argument("--port", type=int, default=8000, help="port of the site")
        parser.add_argument("--dht-port", type=int, default=31337, help="port of the bootstrap DHT peer")
        parser.add_argument("--model", default=settings.SWARM_DEMO_MODEL, help="checkpoint served in two spans")
        parser.add_argument(
            "--moe-model", default=settings.SWARM_DEMO_MOE_MODEL, help="sparse MoE checkpoint served by one server"
        )

    def handle(self, *args, **options) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        stop = threading.Event()
        state = {"starting": True}

        def on_signal(*_) -> None:
            stop.set()
            if state["starting"]:  # cut the start-up waits short; `finally` stops what has started
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        var = Path(settings.VAR_DIR)
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        swarm = LocalSwarm([sys.executable, manage], env={"DEBUG": "1"}, log_dir=var / "logs")
        try:
            self._start(swarm, options, var)
            state["starting"] = False
            self._log("Press Ctrl-C to stop everything.\n")
            while not stop.wait(1.0):
                for process in swarm.processes:
                    if process.process.poll() is not None:
                        self.stderr.write(f"{process.name} exited with {process.process.returncode}; stopping")
                        stop.set()
        except KeyboardInterrupt:
            pass  # Ctrl-C while starting: stop as cleanly as afterwards (exit status 0)
        finally:
            state["starting"] = False  # a second Ctrl-C must not interrupt the stopping
            self._log("Stopping: block servers announce OFFLINE while the site and Celery stop")
            swarm.close(timeout=STOP_TIMEOUT)
            self._log("Stopped")

    def _start(self, swarm: LocalSwarm, options: dict, var: Path) -> None:
        self._log("Starting the bootstrap DHT peer")
        peers = swarm.start_dht(options["host"], options["dht_port"], identity_path=str(var / "bootstrap.id"))
        site_env = {"SWARM_INITIAL_PEERS": " ".join(peers)}
        # Everything below starts at once and is waited for afterwards: most of each start-up is imports.
        servers = []
        for option, span, name in SERVERS:
            self._log(f"Starting block server {name} on blocks {span} of {Path(options[option]).name}")
            args = (options[option], "--block-indices", span, "--public-name", name)
            servers.append(swarm.start_server(*args, name=name, wait=False))
        celery = [sys.executable, "-m", "celery", "-A", "config"]
        # SIGQUIT: Celery's cold shutdown. Its warm one (SIGINT) waits for a crawl in flight, which may take
        # longer than the demo may take to stop; a crawl cut short is simply taken again at the next start.
        worker = [*celery, "worker", "--loglevel", "INFO", "--concurrency", "2"]
        swarm.spawn_command("worker", worker, site_env, stop_signal=signal.SIGQUIT)
        beat_schedule = str(var / "celerybeat-schedule")
        swarm.spawn_command("beat", [*celery, "beat", "--loglevel", "INFO", "-s", beat_schedule], site_env)
        daphne = shutil.which("daphne", path=str(Path(sys.executable).parent)) or "daphne"
        web = swarm.spawn_command(
            "web", [daphne, "-b", options["host"], "-p", str(options["port"]), "config.asgi:application"], site_env
        )
        for server in servers:
            server.wait_until_online()
            self._log(f"Block server {server.name} is online")
        web.wait_for_line(lambda line: "Listening on" in line or "Starting server" in line, timeout=60)
        celery_app.send_task("monitor.tasks.crawl_swarm")  # a first crawl now, not one update period later
        self._print_urls(options, peers, var)

    def _print_urls(self, options: dict, peers: list[str], var: Path) -> None:
        """Every address the README names, for this run's host and port."""
        base = f"http://{options['host']}:{options['port']}"
        rows = [("status page", f"{base}/"), ("chat", f"{base}/chat/")]
        for prefix in dict.fromkeys(model_prefix(options[option]) for option, _, _ in SERVERS):
            rows.append(("model page", f"{base}/models/{prefix}/"))
        rows += [
            ("state API", f"{base}/api/v1/state"),
            ("metrics", f"{base}/metrics"),
            ("chat API", f"ws://{options['host']}:{options['port']}/api/v2/generate"),
            ("OpenAI API", f"{base}/v1"),
            ("initial peers", " ".join(peers)),
            ("logs", str(var / "logs")),
        ]
        self.stdout.write(self.style.SUCCESS("\nThe swarm and the site are running:"))
        for label, value in rows:
            self.stdout.write(f"  {label:<13} {value}")

    def _log(self, message: str) -> None:
        self.stdout.write(message)
        self.stdout.flush()
