"""Conversations, messages and the usage audit trail.

Vocabulary follows the OpenAI Chat Completions API: a *conversation* holds *messages*
with a *role*; one assistant message is produced by one *generation*, which streams
*deltas* and ends with a *finish_reason* and a *usage* (prompt_tokens, completion_tokens).
"""

import uuid
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .excerpt import plain_excerpt
from .money import format_usd


class ConversationQuerySet(models.QuerySet):
    """Conversations, scoped to their owner."""

    def for_user(self, user):
        """Conversations owned by ``user``; empty for anonymous users."""
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(owner=user)

    def lock(self, conversation_id) -> "Conversation | None":
        """The conversation row, locked for the current transaction (PostgreSQL row lock;
        SQLite's IMMEDIATE transactions already serialise writers); None if it does not
        exist. Every transaction that changes a run takes this lock first (prepare,
        finalize, the lease sweep), so PostgreSQL cannot deadlock them."""
        return self.select_for_update().filter(id=conversation_id).first()


class Conversation(models.Model):
    """A chat thread owned by one user. Its id is chosen by the client (a UUID in the URL),
    so a tab can open ``ws/conversations/<uuid>/`` before the row exists; the row is made
    on the first message."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    model = models.CharField(max_length=100, blank=True)
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Automatic stops of its answers (chat.generation.autostop). Null: the deployment's setting
    # (CHAT_REPETITION_GUARD) / no ceiling of its own. A ceiling here can only tighten
    # the deployment's and the owner's budget's: the tightest one applies.
    repetition_guard = models.BooleanField(null=True, blank=True)
    max_answer_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    max_answer_tokens = models.PositiveIntegerField(null=True, blank=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self):
        return self.title or f"Conversation {self.id}"

    TITLE_CHARS = 60

    @classmethod
    def title_from(cls, content: str) -> str:
        """A title from the first user message: its first line, at most 60 characters."""
        line = " ".join(content.strip().split())
        if len(line) <= cls.TITLE_CHARS:
            return line
        return line[: cls.TITLE_CHARS - 1].rstrip() + "…"

    def to_dict(self, timestamp=datetime.isoformat) -> dict:
        """The one JSON shape of a conversation: WebSocket frames, and the REST API
        (chat.api.serializers.ConversationSerializer delegates here). ``timestamp``
        formats datetimes: ISO 8601 as ``isoformat`` gives it in frames, DRF's format
        (``Z`` for UTC) in the REST API."""
        return {
            "id": str(self.id),
            "title": self.title,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "repetition_guard": self.repetition_guard,
            "max_answer_usd": (
                None if self.max_answer_usd is None else f"{self.max_answer_usd:.8f}"
            ),
            "max_answer_tokens": self.max_answer_tokens,
            "created_at": timestamp(self.created_at),
            "updated_at": timestamp(self.updated_at),
        }


class MessageQuerySet(models.QuerySet):
    """Messages: visible ones, streaming ones, and stale ones (dead process)."""

    def visible(self):
        """Messages the user sees: not replaced by a regenerate or an edit."""
        return self.filter(superseded=False)

    def streaming(self):
        return self.filter(status=Message.Status.STREAMING)

    def stale(self, now=None):
        """Streaming messages whose heartbeat is older than ``CHAT_TUNING.lease_s``: the process
        that ran them is gone."""
        now = now or timezone.now()
        cutoff = now - timezone.timedelta(seconds=settings.CHAT_TUNING.lease_s)
        return self.streaming().filter(Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True))


class Message(models.Model):
    """One message of a conversation. Assistant messages are created with status
    ``streaming`` when their generation starts and finalised with one of the end states."""

    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"
        # The process running the generation died; content is the last checkpoint.
        INTERRUPTED = "interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # The reasoning ("thinking") text the provider streamed beside the answer
    # (delta.reasoning_content / delta.reasoning), kept with it; "" when none.
    reasoning = models.TextField(blank=True, default="")
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.COMPLETED, db_index=True
    )
    # As the API gives it ("stop", "length", "content_filter", ...), "cancelled"/"error",
    # or the automatic stop that ended it ("repetition", "cost_limit"; chat.generation.autostop).
    finish_reason = models.CharField(max_length=32, blank=True)
    model = models.CharField(max_length=100, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    # Liveness of a streaming generation: refreshed at every checkpoint by the process
    # (``worker``) that runs it; see MessageQuerySet.stale().
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=100, blank=True)
    # Set when a regenerate or an edit replaced this message; kept for the record.
    superseded = models.BooleanField(default=False)
    # What a streaming answer may still use of its user's quotas (chat.generation.budgets):
    # its prompt estimate plus its own completion-token ceiling, in tokens, and that
    # priced at its model's prices when it started, in USD (null: not priced, the user
    # had no quota then). Set when the run is prepared; counted while it streams.
    reserved_tokens = models.PositiveIntegerField(default=0)
    reserved_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    # Where the provider's answer can be streamed again (the Responses API in background
    # mode, Provider.resume): its response id and the sequence number of the last event
    # in ``content``, saved with each checkpoint (chat.generation.handover).
    response_id = models.CharField(max_length=100, blank=True, default="")
    response_sequence = models.IntegerField(null=True, blank=True)
    # Set by a worker that went away mid-answer for another to continue it at once:
    # ``{"seq": last seq published, "tab": the starting tab or null, "worker": its id}``.
    handover = models.JSONField(null=True, blank=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self):
        # Shown where the admin links a message: plain text, cut at a word.
        return f"{self.role} ({self.status}): {plain_excerpt(self.content, 60)}"

    @property
    def is_final(self) -> bool:
        return self.status != self.Status.STREAMING

    def finish(self, status: str, finish_reason: str, error: str, content: str | None,
               now, reasoning: str | None = None) -> None:
        """Save the end of a streaming answer (its final ``status``). ``content`` None
        keeps the text saved so far (the last checkpoint), as ``reasoning`` None keeps
        the reasoning saved so far. Call it with the row locked
        (chat.generation.store.finalize)."""
        if content is not None:
            self.content = content
        if reasoning is not None:
            self.reasoning = reasoning
        self.status = status
        self.finish_reason = finish_reason
        self.error = error
        self.completed_at = now
        self.heartbeat_at = now
        self.save(update_fields=[
            "content", "reasoning", "status", "finish_reason", "error", "completed_at",
            "heartbeat_at",
        ])

    def to_dict(self, usage: "UsageRecord | None" = None, timestamp=datetime.isoformat) -> dict:
        """The one JSON shape of a message: the ``message`` field of WebSocket frames,
        and the REST API (chat.api.serializers.MessageSerializer delegates here).

        ``usage`` is the generation's UsageRecord when the caller has it at hand;
        otherwise the prefetched/related one is used if present. ``timestamp`` formats
        datetimes (see Conversation.to_dict).
        """
        if usage is None and self.role == self.Role.ASSISTANT:
            try:
                usage = self.usage
            except UsageRecord.DoesNotExist:
                usage = None
        return {
            "id": str(self.id),
            "conversation_id": str(self.conversation_id),
            "role": self.role,
            "content": self.content,
            "reasoning": self.reasoning,
            "status": self.status,
            "finish_reason": self.finish_reason or None,
            "model": self.model,
            "error": self.error or None,
            "created_at": timestamp(self.created_at),
            "completed_at": timestamp(self.completed_at) if self.completed_at else None,
            "usage": usage.to_dict() if usage else None,
        }


class UsageRecordQuerySet(models.QuerySet):
    """Usage records, scoped to their user."""

    def for_user(self, user):
        if not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(user=user)


class UsageRecord(models.Model):
    """Exactly one per generation, whatever its end (completed, cancelled, failed,
    interrupted): the audit trail of what was asked of the provider and what it cost.

    ``source`` says where the token counts come from, best first:

    - ``reported``: the provider's final usage chunk (``stream_options.include_usage``),
      or OpenRouter's generation lookup (``GET /api/v1/generation``), whatever the end;
    - ``running``: the provider's running count at the stop (vLLM/SGLang
      ``continuous_usage_stats``);
    - ``tokenized``: the server's own tokenizer on the saved text (llama.cpp / vLLM
      ``POST /tokenize``);
    - ``estimated``: tiktoken ``cl100k_base`` on the saved text (chat.accounting).

    ``estimated`` stays for older clients: true unless ``source`` is ``reported``.
    ``reasoning_hidden``: the provider bills reasoning tokens it does not stream
    (OpenAI reasoning models), so counts not ``reported`` undercount them.
    ``reasoning_tokens`` (``completion_tokens_details.reasoning_tokens``, part of
    completion_tokens) and ``cached_tokens`` (``prompt_tokens_details.cached_tokens``,
    part of prompt_tokens, priced at ``cached_input_price_per_mtok``) are 0 when not
    reported. Unit prices (USD per 1M tokens) are stored so a later price change never
    rewrites history. Deleting the conversation or message keeps the record (references
    cleared).
    """

    class Source(models.TextChoices):
        REPORTED = "reported"
        RUNNING = "running"
        TOKENIZED = "tokenized"
        ESTIMATED = "estimated"

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="usage_records",
    )
    conversation = models.ForeignKey(
        Conversation, on_delete=models.SET_NULL, null=True, blank=True,
        related_name="usage_records",
    )
    message = models.OneToOneField(
        Message, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    model = models.CharField(max_length=100, db_index=True)
    status = models.CharField(max_length=16, choices=Message.Status.choices, db_index=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    estimated = models.BooleanField(default=False)
    source = models.CharField(
        max_length=16, choices=Source.choices, default=Source.REPORTED, db_index=True
    )
    reasoning_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    reasoning_hidden = models.BooleanField(
        default=False,
        help_text="Whether the provider billed reasoning it did not stream; if so, counts "
        "it did not report undercount it.",
    )
    input_price_per_mtok = models.DecimalField(
        "input price (USD per 1M tokens)", max_digits=12, decimal_places=6, default=0
    )
    output_price_per_mtok = models.DecimalField(
        "output price (USD per 1M tokens)", max_digits=12, decimal_places=6, default=0
    )
    # USD per 1M cached prompt tokens; null: the input price (records older than it).
    cached_input_price_per_mtok = models.DecimalField(
        "cached input price (USD per 1M tokens)", max_digits=12, decimal_places=6,
        null=True, blank=True,
    )
    cost_usd = models.DecimalField("cost (USD)", max_digits=14, decimal_places=8, default=0)
    # Milliseconds from the upstream request to the first content delta; null if none.
    ttft_ms = models.PositiveIntegerField("time to first token (ms)", null=True, blank=True)
    duration_ms = models.PositiveIntegerField("duration (ms)", default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # How the generation ended (as Message.finish_reason, kept if the message is
    # deleted) and the max_tokens it asked for: the report counts automatic stops and
    # the tokens they saved from these. Empty/null on records older than the fields.
    finish_reason = models.CharField(max_length=32, blank=True, db_index=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)

    objects = UsageRecordQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        source = "" if self.source == self.Source.REPORTED else f" ({self.source})"
        return (
            f"{self.model} {self.status}: {self.total_tokens} tokens, "
            f"{format_usd(self.cost_usd)}{source}"
        )

    def to_dict(self) -> dict:
        """The ``usage`` payload of ``generation.end`` frames and API responses: token
        counts (ints), ``cost_usd`` (USD, decimal string), ``source`` (see the class),
        ``estimated`` (bool, older clients) and ``reasoning_hidden`` (bool)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "source": self.source,
            "estimated": self.estimated,
            "reasoning_hidden": self.reasoning_hidden,
            "cost_usd": f"{self.cost_usd:.8f}",
        }


class ModelPrice(models.Model):
    """USD per 1M input, cached input and output tokens for a model name or prefix, from
    a date on. ``cached_input_per_mtok`` null: cached prompt tokens cost the input price
    (providers discount them, e.g. OpenAI's "Cached input" column of its pricing page).

    The price of a generation is the row whose ``model`` is the longest prefix of the
    generation's model among rows already valid (``valid_from`` <= now), newest first.
    Seeded from ``settings.CHAT_MODEL_PRICES``.
    """

    model = models.CharField(max_length=100, help_text="Model name or prefix")
    input_per_mtok = models.DecimalField(
        "input price (USD per 1M tokens)", max_digits=12, decimal_places=6, default=Decimal("0"),
        help_text="USD per 1M input (prompt) tokens",
    )
    output_per_mtok = models.DecimalField(
        "output price (USD per 1M tokens)", max_digits=12, decimal_places=6, default=Decimal("0"),
        help_text="USD per 1M output (completion) tokens",
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input price (USD per 1M tokens)", max_digits=12, decimal_places=6,
        null=True, blank=True,
        help_text="USD per 1M cached input tokens; empty: the input price",
    )
    valid_from = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["model", "-valid_from"]

    def __str__(self):
        cached = (f" (cached ${self.cached_input_per_mtok})"
                  if self.cached_input_per_mtok is not None else "")
        return (f"{self.model}: ${self.input_per_mtok}{cached}/${self.output_per_mtok} "
                "per 1M tokens")


class UserBudget(models.Model):
    """Per-user limits, checked before a generation starts. Empty limits mean unlimited.
    ``max_concurrent`` counts generations across all tabs and processes."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="budget"
    )
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveIntegerField(null=True, blank=True)
    usd_per_day = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    usd_per_month = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    max_concurrent = models.PositiveSmallIntegerField(default=1)
    # Ceiling of each answer's cost (prompt plus answer, USD); empty = none. The answer
    # is stopped when it reaches it (chat.generation.autostop), and the quotas above reserve at
    # most this much per request instead of the whole max_tokens.
    max_answer_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)

    def __str__(self):
        return f"Budget of {self.user}"


# Re-exported: the API token model lives in its own module (chat/ has a 450-line cap).
from .access_tokens import ApiToken, ApiTokenQuerySet  # noqa: E402, F401
