"""Request and response shapes of the REST API.

Messages and conversations are written by ONE serializer shared with the WebSocket
frames: ``Message.to_dict()`` / ``Conversation.to_dict()`` (README, "WebSocket
protocol"). The DRF serializers below declare the fields (for validation and the
OpenAPI schema) and delegate their output there, with DRF's datetime format.
"""

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..generation import autostop
from ..models import ApiToken, Conversation, Message, UsageRecord
from .fields import (
    ModelNameField,
    StrictBooleanField,
    StrictIntegerField,
    TextField,
    UsdAmountField,
)


class UsageSerializer(serializers.ModelSerializer):
    """Usage of one generation (tokens; ``cost_usd`` in USD as a decimal string;
    ``source``: where the counts come from, ``reported``, ``running``, ``tokenized`` or
    ``estimated``; ``estimated`` is true unless ``reported``; ``reasoning_hidden``: the
    provider bills reasoning it did not stream, so a count not reported undercounts it).
    The output is ``UsageRecord.to_dict()``'s (docs/api.md)."""

    cost_usd = serializers.DecimalField(max_digits=14, decimal_places=8, coerce_to_string=True)

    class Meta:
        model = UsageRecord
        fields = ["prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens",
                  "cached_tokens", "source", "estimated", "reasoning_hidden", "cost_usd"]
        read_only_fields = fields

    def to_representation(self, instance):
        return instance.to_dict()


# DRF's rendering of datetimes (``Z`` for UTC), as the API has always answered.
_drf_datetime = serializers.DateTimeField().to_representation


class ConversationSerializer(serializers.ModelSerializer):
    """A conversation. ``model`` must be one of ``CHAT_MODELS`` (empty: the default model);
    all writable fields are optional.

    Automatic stops of its answers (README, "Automatic stops"; null: none of its own):
    ``repetition_guard`` (null: the deployment's ``CHAT_REPETITION_GUARD``),
    ``max_answer_usd`` (USD, prompt plus answer) and ``max_answer_tokens`` (answer
    tokens). The deployment's and the user's budget's ceilings still apply: the
    tightest wins. A change applies from the next answer on."""

    title = TextField(max_length=200, required=False, allow_blank=True)
    model = ModelNameField(max_length=100, required=False, allow_blank=True)
    system_prompt = TextField(
        required=False, allow_blank=True, max_length=settings.CHAT_MAX_MESSAGE_CHARS
    )
    repetition_guard = StrictBooleanField(
        required=False, allow_null=True,
        help_text="Stop answers that loop: true, false, or null for the server's default.",
    )
    max_answer_usd = UsdAmountField(
        required=False, allow_null=True,
        help_text="Stop an answer when its cost (prompt plus answer) reaches this many USD; "
        "null for no ceiling of its own.",
    )
    max_answer_tokens = StrictIntegerField(
        required=False, allow_null=True, min_value=1,
        max_value=autostop.MAX_ANSWER_TOKENS_LIMIT,
        help_text="Stop an answer when it reaches this many tokens; null for no ceiling "
        "of its own.",
    )

    class Meta:
        model = Conversation
        fields = [
            "id", "title", "model", "system_prompt", "repetition_guard", "max_answer_usd",
            "max_answer_tokens", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate_model(self, value):
        return value or settings.CHAT_MODEL

    def to_representation(self, instance):
        return instance.to_dict(timestamp=_drf_datetime)

    def validate_title(self, value):
        return " ".join(value.split())

    def validate_system_prompt(self, value):
        return value.strip()


class MessageSerializer(serializers.ModelSerializer):
    """A message as the user saw it. ``reasoning``: the reasoning ("thinking") text the
    model streamed before its answer ("" for none). ``usage`` is set for assistant
    messages once their generation has ended (null while streaming and for user
    messages)."""

    conversation_id = serializers.UUIDField(read_only=True)
    finish_reason = serializers.CharField(read_only=True, allow_null=True)
    error = serializers.CharField(read_only=True, allow_null=True)
    usage = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = [
            "id", "conversation_id", "role", "content", "reasoning", "status",
            "finish_reason", "model", "error", "created_at", "completed_at", "usage",
        ]
        read_only_fields = fields

    def to_representation(self, instance):
        return instance.to_dict(timestamp=_drf_datetime)

    @extend_schema_field(UsageSerializer(allow_null=True))
    def get_usage(self, message):  # documents the field; the output is Message.to_dict's
        return message.to_dict()["usage"]


class PostMessageSerializer(serializers.Serializer):
    """Body of ``POST /api/conversations/{id}/messages/``."""

    content = TextField(
        max_length=settings.CHAT_MAX_MESSAGE_CHARS,
        help_text="The user message (non-empty, at most CHAT_MAX_MESSAGE_CHARS characters).",
    )


VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "description": "Invalid input: each offending field (or `non_field_errors`) with its "
    "messages; or `detail` for a body that could not be parsed.",
    "properties": {"detail": {"type": "string"}},
    "additionalProperties": {"type": "array", "items": {"type": "string"}},
}


class ErrorSerializer(serializers.Serializer):
    """Error body: ``detail`` always; ``code`` for errors of the generation module
    (``busy``, ``invalid``, ``quota_exceeded``, ``concurrency_limit``, ``overloaded``,
    ``not_found``) with that error's fields (the WebSocket error frame's): e.g.
    ``retry_after_ms`` of ``overloaded``, ``limit`` of ``concurrency_limit``."""

    detail = serializers.CharField()
    code = serializers.CharField(required=False)
    retry_after_ms = serializers.IntegerField(
        required=False, help_text="overloaded: try again after this many ms "
        "(the Retry-After header says the same in whole seconds)")


class StopSerializer(serializers.Serializer):
    """Answer of ``POST /api/conversations/{id}/stop``: ``running`` is true when a
    generation was streaming and has been asked to stop (``message_id`` is its assistant
    message); false when there was nothing to stop."""

    running = serializers.BooleanField()
    message_id = serializers.UUIDField(allow_null=True)


class ExportSerializer(serializers.Serializer):
    """JSON export: the conversation and its visible messages, oldest first."""

    conversation = ConversationSerializer()
    messages = MessageSerializer(many=True)
    exported_at = serializers.DateTimeField()


class UsageTotalsSerializer(serializers.Serializer):
    """Totals of the user's generations: tokens are counts, ``cost_usd`` is USD,
    ``runs`` counts generations, ``stopped_runs`` those that were stopped."""

    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cost_usd = serializers.DecimalField(max_digits=20, decimal_places=8)
    runs = serializers.IntegerField()
    stopped_runs = serializers.IntegerField()


class UsageGroupSerializer(UsageTotalsSerializer):
    """Totals of one group: ``key`` is the day (``YYYY-MM-DD``, UTC) or the model name.
    Tokens are counts; ``cost_usd`` is USD; ``runs`` counts generations, ``stopped_runs``
    those that were stopped (status ``cancelled``)."""

    key = serializers.CharField()


class UsageReportSerializer(serializers.Serializer):
    """``GET /api/usage/``: the user's totals and the same totals per group."""

    group_by = serializers.ChoiceField(choices=["day", "model"])
    since = serializers.DateTimeField(allow_null=True)
    totals = UsageTotalsSerializer()
    groups = UsageGroupSerializer(many=True)


class UsageQuerySerializer(serializers.Serializer):
    """Query parameters of ``GET /api/usage/``: ``group_by`` (day|model), ``since``."""

    group_by = serializers.ChoiceField(
        choices=["day", "model"], default="day",
        help_text="Group by UTC day (newest first) or by model (most tokens first).",
    )


class ApiTokenSerializer(serializers.ModelSerializer):
    """A personal API token as listed (the key itself is never shown again)."""

    name = TextField(max_length=100)

    def validate_name(self, value):
        return " ".join(value.split())

    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at"]
        read_only_fields = ["id", "prefix", "created_at", "last_used_at"]


class NewApiTokenSerializer(ApiTokenSerializer):
    """A token just created: ``key`` is shown this once; send it as
    ``Authorization: Token <key>``."""

    key = serializers.CharField(read_only=True)

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "key"]
        read_only_fields = [*ApiTokenSerializer.Meta.read_only_fields, "key"]
