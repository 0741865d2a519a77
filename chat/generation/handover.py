"""Continuing a run on another worker (a deploy's graceful shutdown): where its
provider's answer can be picked up again (Responses API in background mode:
``Provider.resume``), and the cancel reason that leaves it running at the provider.

The worker going away reads :func:`resume_point` of each run, saves or passes it, and
ends the run with ``generation.cancel(HANDOVER)`` (its answer is then not cancelled at
the provider: chat.generation.counting.cancelled_usage). The worker taking over calls
``provider.resume(request, StreamMeta(), response_id, after_sequence)`` (when
``provider.can_resume``) and reads the events after that point as from
``Provider.stream``. docs/providers.md, "Responses API", has the details.
"""

from __future__ import annotations

from .counting import HANDOVER

__all__ = ["HANDOVER", "resume_point"]


def resume_point(generation) -> tuple[str, int] | None:
    """``(response id, last sequence number)`` of a running generation
    (task.Generation) whose provider numbers its events, else None."""
    meta = generation._meta
    if not meta.generation_id or meta.sequence < 0:
        return None
    return meta.generation_id, meta.sequence
