"""Personal API tokens (a model of the ``chat`` app, imported by chat.models)."""

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiTokenQuerySet(models.QuerySet):
    """Personal API tokens, scoped to their owner."""

    def for_user(self, user):
        """Tokens of ``user``; empty for anonymous users."""
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(user=user)


class ApiToken(models.Model):
    """A personal API token: scripts send ``Authorization: Token <key>`` to the REST API
    and to the WebSocket. A user may hold several, each with a name.

    Only the SHA-256 of the key is stored (the key is 256 random bits, so a fast hash is
    enough, as for GitHub's tokens); the key itself is shown once, at creation.
    ``prefix`` (the first characters of the key) lets the user recognise a token in a
    list. Revoking deletes the row. ``last_used_at`` is refreshed at most once a minute.
    """

    KEY_PREFIX = "chat_"
    LAST_USED_RESOLUTION_S = 60

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=16, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…) of {self.user}"

    @staticmethod
    def hash_key(key: str) -> str:
        """Hex SHA-256 of a key, as stored in ``key_hash``."""
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple["ApiToken", str]:
        """Create a token for ``user``; returns ``(token, key)``. The key (``chat_`` + 43
        URL-safe characters) is not stored and cannot be shown again."""
        key = cls.KEY_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, name=name, key_hash=cls.hash_key(key), prefix=key[:12]
        )
        return token, key

    @classmethod
    def authenticate(cls, key: str):
        """The active user owning ``key``, or None for an unknown key or inactive user.
        Refreshes ``last_used_at`` (at most once per LAST_USED_RESOLUTION_S)."""
        if not key or len(key) > 200:
            return None
        token = cls.objects.select_related("user").filter(key_hash=cls.hash_key(key)).first()
        if token is None or not token.user.is_active:
            return None
        now = timezone.now()
        if token.last_used_at is None or (
            now - token.last_used_at
        ).total_seconds() >= cls.LAST_USED_RESOLUTION_S:
            cls.objects.filter(pk=token.pk).update(last_used_at=now)
            token.last_used_at = now
        return token.user
