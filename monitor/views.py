"""HTML pages: the status page, a model's history, a peer's history."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone

from monitor import charts, conf
from monitor.contribute import contributions
from monitor.crawl import PEER_ID
from monitor.gcpause import paused_gc
from monitor.history import DEFAULT_RANGE, RANGES, model_history, parse_since, peer_history
from monitor.models import ModelStatus, ServerObservation
from monitor.reports import current_report, snapshot_age


def status(request: HttpRequest) -> HttpResponse:
    """The swarm now; `?fragment=1` returns only the part that the page swaps in when a crawl lands."""
    template = "monitor/_status.html" if request.GET.get("fragment") else "monitor/status.html"
    with paused_gc():  # thousands of row dicts at once
        report = current_report()
        context = {
            "report": report,
            "update_period": conf.update_period(),
            "contributions": [],
            "refresh_jitter": conf.refresh_jitter(),
        }
        if report is not None:
            # The open page marks itself stale after this long without a new snapshot (status.js).
            context["stale_in"] = max(conf.gap_seconds() - report.age_seconds, 0.0)
            statuses = [model.status for model in report.models]
            context["contributions"] = contributions(statuses, conf.local_models(), conf.initial_peers())
        return render(request, template, context)


def _range(request: HttpRequest) -> str:
    value = request.GET.get("range", DEFAULT_RANGE)
    return value if value in RANGES else DEFAULT_RANGE


def model_detail(request: HttpRequest, dht_prefix: str) -> HttpResponse:
    status = (
        ModelStatus.objects.filter(dht_prefix=dht_prefix).select_related("snapshot").order_by("-created_at").first()
    )
    if status is None:
        raise Http404("No crawl has seen this model")
    selected = _range(request)
    now = timezone.now()
    history = model_history(dht_prefix, parse_since(selected, now), now)
    context = {
        "status": status,
        "ranges": list(RANGES),
        "selected_range": selected,
        "chart_data": {
            "figures": charts.model_figures(history),
            "history_url": reverse("monitor:model-history", args=[dht_prefix]),
            "range": selected,
        },
        "snapshots": history["snapshots"],
        "availability": history["availability"]["overall"],
        "availability_percent": _percent(history["availability"]["overall"]),
        "stale": snapshot_age(status.snapshot, now)[1],  # the status page's rule: the crawl's finish is the reference
        "state_url": reverse("monitor:state"),
    }
    return render(request, "monitor/model.html", context)


def _percent(share: float | None) -> str:
    return "" if share is None else f"{share * 100:.1f}"


def peer_detail(request: HttpRequest, peer_id: str) -> HttpResponse:
    if not PEER_ID.fullmatch(peer_id):
        raise Http404("Not a peer id")
    latest = ServerObservation.objects.filter(peer_id=peer_id).order_by("-created_at").first()
    if latest is None:
        raise Http404("No crawl has seen this peer")
    selected = _range(request)
    now = timezone.now()
    history = peer_history(peer_id, parse_since(selected, now), now)
    context = {
        "peer_id": peer_id,
        "latest": latest,
        "history": history,
        "ranges": list(RANGES),
        "selected_range": selected,
        "chart_data": {"figures": charts.peer_figures(history)},
    }
    return render(request, "monitor/peer.html", context)
