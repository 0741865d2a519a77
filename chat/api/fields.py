"""Serializer and filter fields whose accepted values are exactly what the schema says,
so a schema-valid request is never refused."""

import datetime

from django import forms
from django.conf import settings
from django.core.validators import ProhibitNullCharactersValidator, RegexValidator
from django_filters import CharFilter, IsoDateTimeFilter
from django_filters.fields import IsoDateTimeField
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers
from rest_framework.fields import empty
from rest_framework.validators import ProhibitSurrogateCharactersValidator

from .. import validation
from ..generation import autostop

# White space for both Python's str.strip() and ECMAScript's \s, plus NUL: a required
# text must contain some other character. Written with escapes both regex dialects read
# the same way, so the schema's ``pattern`` and the server agree on every string.
BLANK_CHARS = (
    r"\x00\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f"
    r"\u3000\ufeff"
)


class TextField(serializers.CharField):
    """Free text whose accepted values are exactly what its schema says.

    Lengths are checked on the string as sent (no trimming first, so ``maxLength``
    means what it says); then the rules of chat.validation, which the WebSocket
    follows too: lone surrogates are refused (400), NUL characters, which PostgreSQL
    text cannot hold, dropped. Unless ``allow_blank``, the text must contain a
    character outside BLANK_CHARS (documented as ``pattern``). Callers normalise white
    space afterwards.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        # DRF's own NUL and surrogate validators give way to the shared rules.
        self.validators = [
            v for v in self.validators
            if not isinstance(
                v, (ProhibitNullCharactersValidator, ProhibitSurrogateCharactersValidator)
            )
        ]
        self.validators.append(validation.refuse_lone_surrogates)
        if not self.allow_blank:
            self.validators.append(
                RegexValidator(f"[^{BLANK_CHARS}]", message="This field must contain text.")
            )

    def run_validation(self, data=empty):
        value = super().run_validation(data)
        return validation.drop_nul(value) if isinstance(value, str) else value

    def to_internal_value(self, data):
        # DRF would turn 12 or 1.5 into "12"/"1.5"; the schema says string.
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class ModelNameField(TextField):
    """One of ``settings.CHAT_MODELS``, or empty for the default model. Checked against
    the settings at request time; documented as an enum of them (extension below)."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if value and value not in settings.CHAT_MODELS:
            raise serializers.ValidationError(
                f"Model {value!r} is not available here; choose one of {settings.CHAT_MODELS}."
            )
        return value


class ModelNameFieldExtension(OpenApiSerializerFieldExtension):
    """Documents ModelNameField in the schema as an enum of ``CHAT_MODELS``."""

    target_class = "chat.api.fields.ModelNameField"

    def map_serializer_field(self, auto_schema, direction):
        return {
            "type": "string",
            "enum": ["", *settings.CHAT_MODELS],
            "description": "A model the server offers; empty for the default model.",
        }


class StrictBooleanField(serializers.BooleanField):
    """JSON ``true``/``false`` only (DRF would also take ``"yes"``, ``1``, ``"on"``...),
    ``null`` when ``allow_null``: exactly what its schema (``type: boolean``) says."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only (DRF would also take ``"12"`` and ``12.0``), within
    ``min_value``/``max_value``, which the schema documents as minimum/maximum."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class UsdAmountField(serializers.DecimalField):
    """A USD amount as a decimal string: at most 6 whole digits and 8 decimals, no sign
    or exponent (``chat.generation.autostop.USD_PATTERN``, documented as the schema's ``pattern``);
    read back as a string with 8 decimals."""

    def __init__(self, **kwargs):
        super().__init__(max_digits=14, decimal_places=8, coerce_to_string=True, **kwargs)

    def validate_empty_values(self, data):
        # DRF's DecimalField reads a blank string as null when null is allowed (a form's
        # empty input); in this JSON API only null is null, and "" is refused as the
        # schema says (a string matching the pattern, or null).
        if isinstance(data, str) and not data.strip():
            return (False, data)
        return super().validate_empty_values(data)

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError("Enter the amount as a string, e.g. \"0.05\".")
        try:
            return autostop.parse_usd(data)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None


class UsdAmountFieldExtension(OpenApiSerializerFieldExtension):
    """Documents UsdAmountField as a string with the pattern it accepts."""

    target_class = "chat.api.fields.UsdAmountField"

    def map_serializer_field(self, auto_schema, direction):
        return {
            "type": "string",
            "format": "decimal",
            "pattern": autostop.USD_PATTERN,
            "example": "0.05",
        }


class NulFreeCharField(forms.CharField):
    """A filter text field that refuses NUL characters (PostgreSQL cannot store them)."""

    def to_python(self, value):
        value = super().to_python(value)
        return validation.drop_nul(value) if value else value


class TextFilter(CharFilter):
    """A CharFilter that drops NUL characters instead of refusing them."""

    field_class = NulFreeCharField


class PresentIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 date-time filter value, converted to UTC; empty is an error."""

    # Only an absent parameter means "no filter"; an empty one is not a date-time.
    empty_values = [None]

    def to_python(self, value):
        if value == "":
            raise forms.ValidationError("Enter a valid date/time.", code="invalid")
        result = super().to_python(value)
        if result is None:
            return None
        # In UTC: PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows (+23:17).
        try:
            return result.astimezone(datetime.UTC)
        except OverflowError:
            raise forms.ValidationError("Date/time out of range.", code="invalid") from None


class DateTimeFilter(IsoDateTimeFilter):
    """An ISO 8601 date or date-time filter; ``?name=`` (empty) is a 400, as the schema's
    ``format: date-time`` says, not silently ignored."""

    field_class = PresentIsoDateTimeField
