"""Browser pages: sign-up and the chat page. Data comes to the page by ``json_script``;
everything live goes over the WebSocket (see README, "WebSocket protocol")."""

import uuid

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.templatetags.static import static
from django.urls import reverse
from django.views.decorators.http import require_http_methods
from django.views.generic import RedirectView

from .forms import SignupForm
from .generation import uses_demo_model
from .models import Conversation


@require_http_methods(["GET", "POST"])
def signup(request):
    """Create an account (chat.forms.SignupForm) and log the new user in."""
    if request.user.is_authenticated:
        return redirect("chat:index")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat:index")
    return render(request, "registration/signup.html", {"form": form}, status=200)


@login_required
def index(request):
    """A fresh conversation id: the row is created by the first message sent to it."""
    return redirect("chat:conversation", conversation_id=uuid.uuid4())


@login_required
def conversation(request, conversation_id):
    """The chat page for one conversation (existing or not yet created).

    Another user's conversation answers 404, as the API does, so ids leak nothing.
    """
    existing = Conversation.objects.filter(id=conversation_id).first()
    if existing is not None and existing.owner_id != request.user.id:
        get_object_or_404(Conversation.objects.for_user(request.user), id=conversation_id)
    recent = Conversation.objects.for_user(request.user).order_by("-updated_at")[:200]
    conversations = [c.to_dict() for c in recent]
    config = {
        "conversation_id": str(conversation_id),
        "ws_path": f"/ws/conversations/{conversation_id}/",
        "new_chat_url": reverse("chat:index"),
        "conversation_url_template": reverse(
            "chat:conversation", kwargs={"conversation_id": uuid.UUID(int=0)}
        ).replace(str(uuid.UUID(int=0)), "{id}"),
        "demo_mode": uses_demo_model(),
        "default_model": settings.CHAT_MODEL,
        "models": settings.CHAT_MODELS,
        "default_system_prompt": settings.CHAT_SYSTEM_PROMPT,
        "max_message_chars": settings.CHAT_MAX_MESSAGE_CHARS,
        "username": request.user.get_username(),
    }
    return render(
        request,
        "chat/chat.html",
        {"config": config, "conversations": conversations, "conversation_id": conversation_id},
    )


class FaviconView(RedirectView):
    """``/favicon.ico``: a temporary redirect (302) to the SVG icon in ``static/``.

    Pages link the icon (``templates/base.html``), but browsers still ask for
    ``/favicon.ico`` on responses without such a link (JSON, the Redoc page, a file
    opened directly), which used to log ``Not Found: /favicon.ico`` each time. Not
    permanent: with ``DEBUG`` off the static name carries a content hash that changes
    with the file, so the target is looked up on each request."""

    permanent = False

    def get_redirect_url(self, *args, **kwargs):
        return static("chat/favicon.svg")
