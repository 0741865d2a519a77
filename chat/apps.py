from django.apps import AppConfig


class ChatConfig(AppConfig):
    """The chat app; registers its system checks when ready."""

    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from . import checks  # noqa: F401  (registers the system checks)
