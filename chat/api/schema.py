"""The OpenAPI schema view, friendly to people who open it in a browser.

drf-spectacular answers ``/api/schema/`` with YAML typed ``application/vnd.oai.openapi``,
a type browsers do not display, so opening the link downloads a file. Here:

- a browser navigating to ``/api/schema/`` (``Accept`` lists ``text/html``, no
  ``?format=``) is redirected (302) to the readable docs, ``/api/docs/``;
- ``?format=json`` answers ``application/json``, which browsers show inline (the
  default JSON renderer's ``application/vnd.oai.openapi+json`` is downloaded too);
- ``?format=yaml`` and every other client (curl, schemathesis, code generators, which
  do not ask for HTML) get what drf-spectacular always served: YAML by default, or the
  media type their ``Accept`` names.

The docs pages load the schema as ``?format=json``, so the schema link they show opens
inline rather than leading back to them.
"""

from __future__ import annotations

from django.shortcuts import redirect
from django.urls import reverse_lazy
from django.utils.text import format_lazy
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerSplitView,
)

JSON_SCHEMA_URL = format_lazy("{}?format=json", reverse_lazy("api:schema"))


def asks_for_html(request) -> bool:
    """Whether the ``Accept`` header names ``text/html`` (a browser navigating), as
    opposed to ``*/*`` or an OpenAPI/JSON/YAML type (scripts and tools)."""
    accept = request.META.get("HTTP_ACCEPT", "")
    return any(part.split(";")[0].strip().lower() == "text/html" for part in accept.split(","))


class SchemaView(SpectacularAPIView):
    """``GET /api/schema/``: the OpenAPI 3 schema (YAML by default, ``?format=json``
    as ``application/json``); a browser asking for HTML is sent to ``/api/docs/``."""

    # application/json before application/vnd.oai.openapi+json: for ``?format=json`` with
    # a browser's ``*/*``, DRF picks the first JSON renderer. An explicit Accept of
    # either type still gets that type.
    renderer_classes = [
        OpenApiYamlRenderer, OpenApiYamlRenderer2, OpenApiJsonRenderer2, OpenApiJsonRenderer,
    ]

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs):
        if "format" not in request.query_params and asks_for_html(request):
            return redirect("api:docs")
        return super().get(request, *args, **kwargs)


class SwaggerView(SpectacularSwaggerSplitView):
    """``/api/docs/``: Swagger UI (offline, from drf-spectacular-sidecar) on the JSON
    schema; its start-up script is served from ``/api/docs/?script``, not inline, so the
    Content-Security-Policy (``script-src 'self'``) lets it run (drf-spectacular's
    split view, meant for CSP)."""

    url = JSON_SCHEMA_URL


class RedocView(SpectacularRedocView):
    """``/api/redoc/``: Redoc (offline) on the JSON schema."""

    url = JSON_SCHEMA_URL
