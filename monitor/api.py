"""JSON and text APIs: health.petals.dev's `/api/v1/state`, `/api/v1/is_reachable/<peer>`, `/metrics`,
and the chart data behind the model page."""

from __future__ import annotations

import asyncio
from functools import partial

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from config.throttle import ProbeLimiter, TooManyProbes
from monitor import charts, conf, swarm_client
from monitor.crawl import PEER_ID
from monitor.history import model_history, parse_since
from monitor.metrics import prometheus_metrics
from monitor.models import ModelStatus
from monitor.reports import current_report, state_json
from swarm.ping import PingResult, ping_server_in_dht

NO_SNAPSHOT = {"error": "no crawl has finished yet"}
REACHABILITY_PROBES = ProbeLimiter()  # this process's cache and limits of is_reachable's dials


@require_GET
def state(request: HttpRequest) -> JsonResponse:
    report = current_report()
    if report is None:
        return JsonResponse(NO_SNAPSHOT, status=503)
    return JsonResponse(state_json(report))


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    report = current_report()
    if report is None:
        return HttpResponse("# no crawl has finished yet\n", content_type="text/plain; version=0.0.4", status=503)
    return HttpResponse(prometheus_metrics(report), content_type="text/plain; version=0.0.4; charset=utf-8")


async def is_reachable(request: HttpRequest, peer_id: str) -> JsonResponse:
    """Ping the peer: servers call this to learn whether the world can reach them. Strangers choose the
    peer, so answers are cached and probes rate-limited per client (config/throttle.py)."""
    your_ip = request.META.get("REMOTE_ADDR")
    if request.method != "GET":
        return JsonResponse({"success": False, "message": "use GET", "your_ip": your_ip}, status=405)
    if not PEER_ID.fullmatch(peer_id):
        return JsonResponse({"success": False, "message": "not a peer id", "your_ip": your_ip}, status=400)

    async def probe() -> PingResult:
        # Starting the DHT client blocks for seconds the first time: keep it off the event loop.
        dht = await sync_to_async(swarm_client.get_dht, thread_sensitive=False)(conf.initial_peers())
        timeout = float(conf.crawl_options().ping_timeout)
        # run in the DHT process, which imports it by name: not from here (Django models)
        future = dht.run_coroutine(partial(ping_server_in_dht, peer_id=peer_id, timeout=timeout), return_future=True)
        try:  # a wedged DHT must not hold this request (nor the probes sharing it) forever
            return await asyncio.wait_for(future, timeout + 5)  # MPFuture is awaitable
        except TimeoutError:
            raise RuntimeError(f"the monitor's DHT did not answer within {timeout + 5:g} s; try again later") from None

    try:
        result = await REACHABILITY_PROBES.run(peer_id, your_ip or "unknown", probe)
    except TooManyProbes as e:
        return JsonResponse({"success": False, "message": str(e), "your_ip": your_ip}, status=429)
    except RuntimeError as e:
        return JsonResponse({"success": False, "message": str(e), "your_ip": your_ip}, status=503)
    return JsonResponse({"success": result.reachable, "message": result.error, "your_ip": your_ip})


@require_GET
def model_history_api(request: HttpRequest, dht_prefix: str) -> JsonResponse:
    now = timezone.now()
    try:
        since = parse_since(request.GET.get("since"), now)
    except (ValueError, OverflowError, OSError) as e:
        return JsonResponse({"error": str(e)}, status=400)
    if not ModelStatus.objects.filter(dht_prefix=dht_prefix).exists():  # as the model's page: 404
        return JsonResponse({"error": f"no crawl has seen the model {dht_prefix!r}"}, status=404)
    history = model_history(dht_prefix, since, now)
    return JsonResponse({**history, "figures": charts.model_figures(history)})
