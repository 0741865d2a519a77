"""A browser tab's identity across its sockets, and the rule that a closed tab stops
the answer it started.

The page keeps a random id in ``sessionStorage`` (one per tab, kept across reloads of
that tab and across reconnects) and sends it as the ``tab`` query parameter of the
socket URL (static/chat/protocol.js). A run records the tab that started it
(``Generation.tab``). When a socket of that tab disconnects, on whichever worker, the
run is stopped: directly when it runs here, else through the conversation's control
group (``request_stop`` with the tab, honoured only by the run that tab started).

A worker that drains (chat.generation.drain) closes its sockets with 1012 and stops
nothing: the tabs reconnect elsewhere, keep their id, and keep the right to stop.
"""

import re
from urllib.parse import parse_qs

from . import generation as gen

# A UUID from crypto.randomUUID(), or any short token of the same alphabet.
TAB_PATTERN = re.compile(r"[A-Za-z0-9-]{1,64}")


def tab_of(scope: dict) -> str | None:
    """The ``tab`` query parameter of a WebSocket scope (ASGI ``query_string``, bytes),
    or None when it is missing or is not 1 to 64 letters, digits and dashes."""
    query = (scope.get("query_string") or b"").decode("latin-1")
    values = parse_qs(query).get("tab")
    tab = values[0] if values else ""
    return tab if TAB_PATTERN.fullmatch(tab) else None


async def stop_tab_run(consumer, reason: str) -> None:
    """``consumer``'s socket is gone (``reason``: ``disconnect``, ``teardown``): stop
    the run its tab started, unless this worker drains. The run this socket started
    here is cancelled at once; a run its tab started through an earlier socket (before
    a reconnect) is asked to stop wherever it runs, when this socket saw one. Raises
    what the channel layer raises."""
    if gen.drain.is_draining():
        return
    if consumer.generation is not None and consumer.generation.cancel(reason):
        return
    if consumer.tab and consumer.authorized and consumer.saw_run:
        await gen.request_stop(consumer.conversation_id, user_id=consumer.user.id,
                               reason=reason, tab=consumer.tab, layer=consumer.channel_layer)
