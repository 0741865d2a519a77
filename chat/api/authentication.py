"""DRF authentication by personal API token (``Authorization: Token <key>``)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from ..auth import token_from_header
from ..models import ApiToken


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Token <key>`` with a key from :class:`chat.models.ApiToken`.

    No header, or another scheme: not this authenticator's business (returns None, so
    session authentication may apply). A Token header with an unknown or revoked key:
    401 (AuthenticationFailed). Listed first in DEFAULT_AUTHENTICATION_CLASSES so that
    anonymous requests answer 401 with ``WWW-Authenticate: Token``.
    """

    keyword = "Token"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request)
        parts = header.split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        key = token_from_header(header)
        if key is None:
            raise exceptions.AuthenticationFailed("Malformed token header.")
        user = ApiToken.authenticate(key)
        if user is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked token.")
        return (user, None)

    def authenticate_header(self, request):
        return self.keyword


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """Documents the token scheme in the OpenAPI schema (securitySchemes.tokenAuth)."""

    target_class = "chat.api.authentication.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": 'Personal API token, sent as "Token <key>" (create one at '
            "/settings/tokens/ or with POST /api/tokens/).",
        }
