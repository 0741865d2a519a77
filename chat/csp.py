"""The Content-Security-Policy header (django-csp): settings.CONTENT_SECURITY_POLICY on
every response, with inline styles allowed on the API's own HTML pages.

DRF's browsable API writes ``style="..."`` attributes in its templates, and Swagger UI
and Redoc (drf-spectacular) a ``<style>`` block and styles they insert at run time;
with ``style-src 'self'`` the browser refuses them and reports a violation. Scripts stay
``'self'`` there too (Swagger UI's start-up script is a file: chat.api.schema). Styles
cannot run code, so the relaxation is on styles (and Redoc's worker) only, and only
under the API's prefix. Redoc's template also asks for Google's fonts and Redocly's
logo: other hosts, which the policy keeps refusing (the docs work offline).
"""

from __future__ import annotations

from csp.constants import SELF, UNSAFE_INLINE
from csp.middleware import CSPMiddleware, PolicyParts

# Where chatproject/urls.py includes chat.api.urls.
API_PREFIX = "/api/"
# Added to the policy's directives on API pages (django-csp's "update" format). Redoc
# runs its search index in a worker made from a blob: URL of its own script.
API_PAGE_UPDATE = {"style-src": [UNSAFE_INLINE], "worker-src": [SELF, "blob:"]}


class ContentSecurityPolicyMiddleware(CSPMiddleware):
    """django-csp's CSPMiddleware, extended as its documentation describes (override
    ``get_policy_parts``): responses under API_PREFIX get API_PAGE_UPDATE unless their
    view set an update of its own (``csp.decorators.csp_update``)."""

    def get_policy_parts(self, request, response, report_only: bool = False) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        if parts.update is None and request.path_info.startswith(API_PREFIX):
            parts.update = API_PAGE_UPDATE
        return parts
