from django.apps import AppConfig


class PlaygroundConfig(AppConfig):
    name = "playground"
    verbose_name = "Chat playground"

    def ready(self) -> None:
        from playground import checks  # noqa: F401  (registers the system checks)
