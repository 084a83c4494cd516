"""System checks: a broken PLAYGROUND_MODELS is reported by `manage.py check` and at startup,
not by the first visitor's request."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured


@checks.register()
def check_models_setting(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.conf import settings

    from playground.catalog import parse_models

    try:
        parse_models(settings.PLAYGROUND_MODELS)
    except ImproperlyConfigured as e:
        return [checks.Error(str(e), id="playground.E001")]
    return []
