"""The history stops growing with strangers' data: coverage becomes two arrays per ModelStatus (the
BlockCoverage rows, one per block and crawl, are converted and dropped), and only the latest snapshot
keeps its servers' adapters and next_pings (`Snapshot.details_kept`; older ones still holding them
expire with the retention period instead of being rewritten here in one huge UPDATE)."""

from itertools import groupby
from operator import itemgetter

from django.db import migrations, models

BATCH = 500


def coverage_to_arrays(apps, schema_editor) -> None:
    """One pass over the old rows in (model, block) order; ModelStatus rows updated in batches."""
    BlockCoverage = apps.get_model("monitor", "BlockCoverage")
    ModelStatus = apps.get_model("monitor", "ModelStatus")
    Snapshot = apps.get_model("monitor", "Snapshot")
    rows = (
        BlockCoverage.objects.order_by("model_id", "block")
        .values_list("model_id", "block", "online_servers", "throughput")
        .iterator(chunk_size=10_000)
    )
    pending: dict[int, tuple[list[int], list[float]]] = {}
    for model_id, group in groupby(rows, key=itemgetter(0)):
        counts: list[int] = []
        rates: list[float] = []
        for _, block, count, rate in group:
            missing = block - len(counts)  # a block without a row had no server
            counts += [0] * missing + [count]
            rates += [0.0] * missing + [float(f"{rate:.6g}")]
        pending[model_id] = counts, rates
        if len(pending) == BATCH:
            _store(ModelStatus, pending)
            pending = {}
    _store(ModelStatus, pending)
    latest = Snapshot.objects.order_by("-created_at", "-pk").first()
    if latest is not None:
        Snapshot.objects.filter(pk=latest.pk).update(details_kept=True)


def _store(ModelStatus, arrays: dict[int, tuple[list[int], list[float]]]) -> None:
    """Write the arrays, padded to each model's blocks (trailing blocks without a row had no server)."""
    statuses = list(ModelStatus.objects.filter(pk__in=arrays).only("pk", "num_blocks"))
    for status in statuses:
        counts, rates = arrays[status.pk]
        missing = max(status.num_blocks - len(counts), 0)
        status.coverage, status.coverage_throughput = counts + [0] * missing, rates + [0.0] * missing
    ModelStatus.objects.bulk_update(statuses, ["coverage", "coverage_throughput"])


class Migration(migrations.Migration):
    dependencies = [
        ("monitor", "0001_initial"),
    ]

    operations = [
        # The old rows' reverse accessor was ModelStatus.coverage: free the name for the new field.
        migrations.AlterField(
            model_name="blockcoverage",
            name="model",
            field=models.ForeignKey(on_delete=models.deletion.CASCADE, related_name="+", to="monitor.modelstatus"),
        ),
        migrations.AlterField(
            model_name="blockcoverage",
            name="snapshot",
            field=models.ForeignKey(on_delete=models.deletion.CASCADE, related_name="+", to="monitor.snapshot"),
        ),
        migrations.AddField(
            model_name="modelstatus",
            name="coverage",
            field=models.JSONField(default=list, help_text="per block: online, reachable servers holding it"),
        ),
        migrations.AddField(
            model_name="modelstatus",
            name="coverage_throughput",
            field=models.JSONField(default=list, help_text="per block: their summed throughput"),
        ),
        migrations.AddField(
            model_name="snapshot",
            name="details_kept",
            field=models.BooleanField(
                default=False,
                help_text="its servers' adapters and next_pings are still stored (the latest snapshot)",
            ),
        ),
        migrations.AlterField(
            model_name="serverobservation",
            name="adapters",
            field=models.JSONField(default=list, help_text="cleared once a later snapshot is stored"),
        ),
        migrations.AlterField(
            model_name="serverobservation",
            name="next_pings",
            field=models.JSONField(
                help_text="peer id → seconds (null: unreachable); cleared once a later snapshot is stored", null=True
            ),
        ),
        migrations.AddIndex(
            model_name="snapshot",
            index=models.Index(
                condition=models.Q(("details_kept", True)), fields=["details_kept"], name="snapshot_details"
            ),
        ),
        migrations.RunPython(coverage_to_arrays, migrations.RunPython.noop, elidable=True),
        migrations.DeleteModel(
            name="BlockCoverage",
        ),
    ]
