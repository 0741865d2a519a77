"""``GET /metrics``: the Prometheus text format of chat.metrics, for the holder of
``CHAT_METRICS_TOKEN`` only."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import Http404, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import metrics


def _bearer(request) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (the scheme is
    case-insensitive: RFC 6750 section 2.1, RFC 9110 section 11.1), else None."""
    parts = request.headers.get("Authorization", "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


@require_GET
def metrics_view(request):
    """Every worker's metrics (chat.metrics.registry) in the Prometheus text format
    (prometheus_client.CONTENT_TYPE_LATEST). Raises Http404, as for a page that does not exist, when
    ``CHAT_METRICS_TOKEN`` is unset or the request does not present it as a bearer
    token (compared in constant time)."""
    expected = settings.CHAT_METRICS_TOKEN
    presented = _bearer(request)
    if not expected or presented is None or not hmac.compare_digest(
            presented.encode(), expected.encode()):
        raise Http404("No metrics here.")
    response = HttpResponse(generate_latest(metrics.registry()),
                            content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
