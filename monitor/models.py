"""What the crawls saw, kept as history: one snapshot per crawl and its rows.

Rows carry their snapshot's time and model prefix (denormalized) so that history queries for a
model or a peer run on one composite index without joins.

What strangers fill freely is kept small: a model's per-block coverage is two arrays on its ModelStatus
(one row per model and crawl, not one per block), and the servers' `adapters` and `next_pings` are kept
only in the latest snapshot (`Snapshot.details_kept`), the only one pages and APIs read them from.
"""

from __future__ import annotations

from django.db import models

from monitor.states import ServerState, display_state

__all__ = ["BootstrapObservation", "ModelStatus", "ServerObservation", "ServerState", "Snapshot"]


class Snapshot(models.Model):
    created_at = models.DateTimeField(db_index=True, help_text="when the crawl started")
    duration = models.FloatField(help_text="seconds the crawl took")
    num_servers = models.PositiveIntegerField(default=0)
    invalid_entries = models.PositiveIntegerField(default=0, help_text="malformed block announcements skipped")
    invalid_index_entries = models.PositiveIntegerField(default=0, help_text="malformed model index entries")
    skipped_models = models.PositiveIntegerField(default=0, help_text="indexed models over the caps")
    capped_servers = models.PositiveIntegerField(default=0, help_text="servers over the per-model cap")
    unchecked_servers = models.PositiveIntegerField(default=0, help_text="online servers not pinged")
    details_kept = models.BooleanField(
        default=False, help_text="its servers' adapters and next_pings are still stored (the latest snapshot)"
    )

    class Meta:
        ordering = ["-created_at"]
        get_latest_by = "created_at"
        # Few rows are True (the latest, rarely one more): the writer finds them without a scan.
        indexes = [
            models.Index(fields=["details_kept"], condition=models.Q(details_kept=True), name="snapshot_details")
        ]

    def __str__(self) -> str:
        return f"snapshot {self.pk} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class ModelStatus(models.Model):
    snapshot = models.ForeignKey(Snapshot, on_delete=models.CASCADE, related_name="models")
    created_at = models.DateTimeField()
    position = models.PositiveSmallIntegerField(help_text="order on the status page")
    dht_prefix = models.CharField(max_length=128)
    name = models.CharField(max_length=300)
    repository = models.CharField(max_length=300, blank=True)
    num_blocks = models.PositiveIntegerField()
    official = models.BooleanField(default=True, help_text="configured, not only found in the model index")
    healthy = models.BooleanField(help_text="every block is held by an online, reachable server")
    num_servers = models.PositiveIntegerField(default=0)
    invalid_entries = models.PositiveIntegerField(default=0)
    coverage = models.JSONField(default=list, help_text="per block: online, reachable servers holding it")
    coverage_throughput = models.JSONField(default=list, help_text="per block: their summed throughput")

    class Meta:
        ordering = ["snapshot", "position"]
        indexes = [models.Index(fields=["dht_prefix", "created_at"])]
        constraints = [models.UniqueConstraint(fields=["snapshot", "dht_prefix"], name="one_status_per_model")]

    def __str__(self) -> str:
        return f"{self.dht_prefix} in snapshot {self.snapshot_id}"

    def missing_blocks(self) -> list[int]:
        """Blocks no online, reachable server holds (beyond the stored coverage: none stored, none known)."""
        stored = self.coverage or []
        return [block for block in range(self.num_blocks) if block >= len(stored) or not stored[block]]


class ServerObservation(models.Model):
    snapshot = models.ForeignKey(Snapshot, on_delete=models.CASCADE, related_name="servers")
    model = models.ForeignKey(ModelStatus, on_delete=models.CASCADE, related_name="servers")
    created_at = models.DateTimeField()
    dht_prefix = models.CharField(max_length=128)
    peer_id = models.CharField(max_length=128)
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    state = models.PositiveSmallIntegerField(choices=ServerState.choices)
    reachable = models.BooleanField(null=True, help_text="None: not pinged")
    error = models.CharField(max_length=300, blank=True)
    rpc_latency = models.FloatField(null=True, help_text="seconds")
    throughput = models.FloatField()
    inference_rps = models.FloatField(null=True)
    forward_rps = models.FloatField(null=True)
    network_rps = models.FloatField(null=True)
    cache_tokens_left = models.BigIntegerField(null=True)
    version = models.CharField(max_length=256, blank=True)
    public_name = models.CharField(max_length=256, blank=True)
    torch_dtype = models.CharField(max_length=256, blank=True)
    quant_type = models.CharField(max_length=16, blank=True)
    using_relay = models.BooleanField(null=True)
    adapters = models.JSONField(default=list, help_text="cleared once a later snapshot is stored")
    next_pings = models.JSONField(
        null=True, help_text="peer id → seconds (null: unreachable); cleared once a later snapshot is stored"
    )

    class Meta:
        indexes = [
            models.Index(fields=["peer_id", "created_at"]),
            models.Index(fields=["dht_prefix", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.peer_id} {self.start}:{self.end} in snapshot {self.snapshot_id}"

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def display_state(self) -> str:
        """online / unknown / unreachable / joining / offline (monitor.states.display_state)."""
        return display_state(self.state, self.reachable)


class BootstrapObservation(models.Model):
    snapshot = models.ForeignKey(Snapshot, on_delete=models.CASCADE, related_name="bootstrap")
    position = models.PositiveSmallIntegerField()
    peer_id = models.CharField(max_length=128)
    reachable = models.BooleanField()
    error = models.CharField(max_length=300, blank=True)
    rtt = models.FloatField(null=True)

    class Meta:
        ordering = ["snapshot", "position"]

    def __str__(self) -> str:
        return f"bootstrap {self.peer_id}: {'online' if self.reachable else 'unreachable'}"
