"""The page where a user creates and revokes personal API tokens (``/settings/tokens/``).

Plain server-rendered forms (POST with CSRF); the key of a new token is rendered once,
in the answer to the POST that created it, and never stored. The page is sent with
``Cache-Control: no-store`` (``never_cache``) so no browser or proxy cache keeps a key.
"""

from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from .models import ApiToken

MAX_NAME = ApiToken._meta.get_field("name").max_length


@never_cache
@login_required
@require_http_methods(["GET", "POST"])
def tokens(request):
    """GET lists the user's tokens. POST ``action=create`` with ``name`` creates one and
    shows its key once; POST ``action=revoke`` with ``token_id`` deletes one of the
    user's tokens (404 for anyone else's), then redirects back (post/redirect/get)."""
    new_key = None
    error = None
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "revoke":
            token = get_object_or_404(
                ApiToken.objects.for_user(request.user), id=_int(request.POST.get("token_id"))
            )
            token.delete()
            return redirect("chat:tokens")
        if action == "create":
            name = " ".join(request.POST.get("name", "").split())
            if not name:
                error = "Give the token a name (what script or machine will use it)."
            elif len(name) > MAX_NAME:
                error = f"A name is at most {MAX_NAME} characters."
            else:
                _, new_key = ApiToken.issue(request.user, name)
        else:
            error = "Unknown action."
    status = 400 if error else 200
    return render(
        request,
        "chat/tokens.html",
        {
            "tokens": ApiToken.objects.for_user(request.user),
            "new_key": new_key,
            "error": error,
            "max_name": MAX_NAME,
        },
        status=status,
    )


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
