from __future__ import annotations

from django.urls import path

from monitor import api, views

app_name = "monitor"

urlpatterns = [
    path("", views.status, name="status"),
    # Prefixes may contain "/" (BLOOM: "bigscience/bloom-petals"), hence `path:`.
    path("models/<path:dht_prefix>/", views.model_detail, name="model"),
    path("peers/<str:peer_id>/", views.peer_detail, name="peer"),
    path("api/v1/state", api.state, name="state"),
    path("api/v1/is_reachable/<str:peer_id>", api.is_reachable, name="is-reachable"),
    path("api/v1/models/<path:dht_prefix>/history", api.model_history_api, name="model-history"),
    path("metrics", api.metrics, name="metrics"),
]
