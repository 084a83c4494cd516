"""HTTP routes of the playground: the chat page, chat.petals.dev's HTTP API and the OpenAI API."""

from __future__ import annotations

from django.urls import path

from playground import openai_api, views

app_name = "playground"

urlpatterns = [
    path("chat/", views.chat_page, name="chat"),
    path("api/v1/models", views.models_api, name="models"),
    path("api/v1/generate", views.http_generate, name="generate"),
    path("v1/chat/completions", openai_api.chat_completions, name="openai-chat-completions"),
    path("v1/models", openai_api.list_models, name="openai-models"),
]
