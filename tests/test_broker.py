"""The embedded broker: messages appear only whole, so a polling worker never reads a half-written file."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection

from config.broker import Transport


def test_messages_round_trip_and_half_written_files_are_skipped(tmp_path: Path) -> None:
    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "control_folder": str(tmp_path)}
    with Connection("filesystem://", transport=Transport, transport_options=options) as connection:
        channel = connection.default_channel
        # What kombu's own writer leaves between creating a file and writing it, under our writer's temporary name.
        (tmp_path / "1_x.celery.msg.partial").write_bytes(b"")
        channel._put("celery", {"task": "crawl"})
        assert [p.name.endswith(".celery.msg") for p in tmp_path.iterdir()].count(True) == 1
        assert channel._get("celery") == {"task": "crawl"}
        assert (tmp_path / "1_x.celery.msg.partial").exists()  # never taken as a message


def test_embedded_settings_use_it() -> None:
    from django.conf import settings

    if settings.REDIS_URL:
        assert settings.CELERY_BROKER_URL == settings.REDIS_URL
    else:
        assert settings.CELERY_BROKER_TRANSPORT == "config.broker:Transport"
