"""The embedded broker: messages appear only whole, so a polling worker never reads a half-written file."""

from __future__ import annotations

import logging
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


def test_connections_log_no_missing_hostname_warning(tmp_path: Path, caplog) -> None:
    """kombu's virtual transports warn "No hostname was supplied" whenever a worker describes its connection."""
    from django.conf import settings

    from config.celery import app

    options = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path), "control_folder": str(tmp_path)}
    caplog.set_level(logging.DEBUG, logger="kombu")
    with Connection("filesystem://", transport=Transport, transport_options=options) as connection:
        connection.info()
        connection.clone().release()
    if not settings.REDIS_URL:  # the app as the workers and beat configure it
        with app.connection_for_write() as connection:
            assert connection.transport_cls == "config.broker:Transport"
            connection.info()
            connection.clone().release()
    assert not [r for r in caplog.records if "hostname" in r.getMessage()]
