"""The chat page, the model list with live availability, and chat.petals.dev's HTTP API."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_POST

from playground import availability, schemas
from playground.catalog import configured_models
from playground.csrf import csrf_protect_browsers
from playground.errors import BadRequest, public_message
from playground.replies import fit_session, plan_reply, temporary_conversation

logger = logging.getLogger(__name__)


@require_GET
def chat_page(request: HttpRequest) -> HttpResponse:
    models = [
        {
            "name": spec.name,
            "display_name": spec.display_name,
            "defaults": spec.defaults.as_dict(),
            "max_length": spec.session_cap,
        }
        for spec in configured_models().values()
    ]
    config = {
        "models": models,
        "max_new_tokens": settings.PLAYGROUND_MAX_NEW_TOKENS,
        "max_input_chars": settings.PLAYGROUND_MAX_INPUT_CHARS,
        # What a resumed chat may send (the oldest messages beyond it are left out, and the page says so).
        "max_history_chars": schemas.max_history_chars(),
        "max_history_messages": schemas.MAX_MESSAGES,
        "sampling_limits": {
            key: {"min": low, "max": high, "min_excluded": excluded}
            for key, (low, high, excluded) in schemas.SAMPLING_LIMITS.items()
        },
    }
    return render(request, "playground/chat.html", {"config": config, "models": models})


@require_GET
async def models_api(request: HttpRequest) -> JsonResponse:
    """GET /api/v1/models: the configured models and whether their blocks are served right now."""
    try:
        return JsonResponse({"ok": True, "models": await availability.all_models()})
    except Exception as e:
        error = public_message(e, "model list")
        return JsonResponse({"ok": False, "traceback": str(error)}, status=error.status)


@require_POST
@csrf_protect_browsers
async def http_generate(request: HttpRequest) -> JsonResponse:
    """POST /api/v1/generate (chat.petals.dev): one generation, one JSON answer `{ok, outputs}`."""
    try:
        model, generate = schemas.parse_http_generate(_parameters(request))
        async with temporary_conversation(model, _client_address(request)) as conversation:
            new_ids, options = plan_reply(conversation, generate)
            fit_session(conversation, new_ids, options)
            outputs, tokens, final = [], 0, None
            async for chunk in conversation.reply(new_ids, options):
                outputs.append(chunk.text)
                tokens += chunk.token_count
                final = chunk
        return JsonResponse(
            {
                "ok": True,
                "outputs": "".join(outputs),
                "token_count": tokens,
                "stop_reason": final.stop_reason if final else None,
                "tokens_per_second": final.tokens_per_second if final else None,
                "route": final.route if final else None,
            }
        )
    except Exception as e:
        error = public_message(e, "HTTP generate")
        return JsonResponse({"ok": False, "traceback": str(error)}, status=error.status)


def _parameters(request: HttpRequest) -> dict[str, Any]:
    """JSON body or form fields (and query parameters), as chat.petals.dev accepts both."""
    try:
        if request.content_type == "application/json":
            body = json.loads(request.body or b"{}")
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            return body
        return schemas.coerce_form({**request.GET.dict(), **request.POST.dict()})
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None


def _client_address(request: HttpRequest) -> str:
    return request.META.get("REMOTE_ADDR") or "unknown"
