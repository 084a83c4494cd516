"""Production settings: refuse to start without a secret key, DEBUG off unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

PRINT_SETTINGS = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.DEBUG, settings.SESSION_COOKIE_SECURE, getattr(settings, 'SECURE_HSTS_SECONDS', 0))"
)


def run_settings(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY", "SECURE_PROXY")}
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_without_secret_key_refuses_to_start():
    result = run_settings()
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_debug_is_off_by_default():
    result = run_settings(SECRET_KEY="x" * 50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "0"]


def test_behind_a_proxy_cookies_are_secure_and_hsts_is_on():
    result = run_settings(SECRET_KEY="x" * 50, SECURE_PROXY="1")
    assert result.returncode == 0, result.stderr
    debug, secure_cookies, hsts = result.stdout.split()
    assert (debug, secure_cookies) == ("False", "True") and int(hsts) > 0


def test_health_endpoint(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}
