"""What one socket may show: the order of a conversation's frames, without I/O.

A socket gets one ``state`` frame, then the group's frames. :class:`FrameSequencer`
decides, frame by frame, what the socket sends so a tab sees every character exactly
once and never a hole:

* frames arriving before the state is sent are held, and released after it;
* deltas and reasoning frames (one seq series: both are "deltas" below) already
  included in the state (seq <= the state's seq) are dropped, as are
  deltas of messages final in the state, and duplicates;
* a delta whose seq skips one (a group message was lost, e.g. a Redis channel over
  capacity) asks for a resync: a fresh state; the delta is held meanwhile;
* while the state's position is unknown (taken from a checkpoint: seq None) deltas of
  that message are dropped: the resync under way includes their text;
* ``generation.end`` is sent once per message (a swept run may end twice: sweep and
  task), and an ``interrupted`` end asks for a resync (its saved text is the last
  checkpoint, which the socket may not match exactly).

The consumer does the I/O: it sends, loads the state, asks for snapshots.
"""

from __future__ import annotations

import enum

from . import frames


class Action(enum.Enum):
    """What to do with one group frame."""

    HOLD = "hold"  # kept until the state is sent (next_held gives it back)
    DROP = "drop"
    SEND = "send"
    RESYNC = "resync"  # send nothing; held; send a fresh state
    SEND_THEN_RESYNC = "send_then_resync"


class FrameSequencer:
    """The sequence state of one socket. Pure: no I/O, no clock."""

    def __init__(self) -> None:
        self.state_sent = False
        self._held: list[dict] = []
        # Last seq sent per message; None: unknown (state taken from a checkpoint).
        self._last_seq: dict[str, int | None] = {}
        # Messages final in the last state sent: late deltas of them are dropped.
        self._closed: set[str] = set()
        # generation.end already sent.
        self._ended: set[str] = set()

    def begin_resync(self, *, forget_positions: bool = False) -> None:
        """A fresh state is being prepared: hold frames from now until it is sent.
        ``forget_positions``: the new state carries a snapshot, whose seq replaces
        what was known."""
        self.state_sent = False
        if forget_positions:
            self._last_seq.clear()

    def state(self, state: dict, generation: dict | None) -> dict:
        """The ``state`` frame to send for ``state`` (store.load_state's dict) and the
        running generation's snapshot ``{"message_id", "content", "reasoning", "seq"}``
        (or None), within the state's byte budget (frames.state: the latest messages,
        ``has_more``, a message too large cut and flagged ``truncated``);
        marks the state sent. Held frames are then released by :meth:`next_held`.

        A snapshot cut to its end still fits the seq series: its ``seq`` says which
        deltas its (shown) end includes, and later deltas continue it."""
        self._closed = {m["id"] for m in state["messages"] if m["status"] != "streaming"}
        messages = state["messages"]
        if generation is not None:
            self._last_seq[generation["message_id"]] = generation["seq"]
            messages = [
                {**m, "content": generation["content"],
                 "reasoning": generation.get("reasoning", m.get("reasoning", ""))}
                if m["id"] == generation["message_id"] else m
                for m in messages
            ]
        self.state_sent = True
        return frames.state(state["conversation"], messages, generation,
                            has_more=state.get("has_more", False))

    def hold(self, frame: dict) -> bool:
        """Hold ``frame`` if the state is not sent yet; returns whether it was held."""
        if self.state_sent:
            return False
        self._held.append(frame)
        return True

    def next_held(self) -> dict | None:
        """The next held frame to decide on, once the state is sent; None when there is
        none or a resync started again (the rest stays held)."""
        if not self.state_sent or not self._held:
            return None
        return self._held.pop(0)

    def decide(self, frame: dict) -> Action:
        """What to do with ``frame``, a group frame, once the state is sent."""
        if not self.state_sent:
            self._held.append(frame)
            return Action.HOLD
        kind = frame["type"]
        if kind in ("delta", "reasoning"):
            message_id = frame["message_id"]
            if message_id in self._closed:
                return Action.DROP
            last = self._last_seq.get(message_id, 0)
            if last is None or frame["seq"] <= last:
                return Action.DROP
            if frame["seq"] > last + 1:
                # Held first, so the fresh state decides on it before later frames.
                self._held.insert(0, frame)
                self.state_sent = False
                return Action.RESYNC
            self._last_seq[message_id] = frame["seq"]
        if kind == "generation.end":
            if frame["message_id"] in self._ended:
                return Action.DROP
            self._ended.add(frame["message_id"])
            if frame["status"] == "interrupted":
                return Action.SEND_THEN_RESYNC
        return Action.SEND

    def last_seq(self, message_id: str) -> int | None:
        """The last seq sent of ``message_id`` (0: none; None: unknown)."""
        return self._last_seq.get(message_id, 0)
