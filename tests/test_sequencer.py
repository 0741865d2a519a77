"""FrameSequencer on its own: what one socket sends of a conversation's group frames
(chat/generation/sequencer.py). Pure: no database, no channel layer, no event loop."""

from chat.generation import frames
from chat.generation.sequencer import Action, FrameSequencer

M = "11111111-1111-1111-1111-111111111111"


def state(*messages):
    return {"conversation": {"id": "c"}, "messages": list(messages), "streaming": None}


def streaming_row(content=""):
    return {"id": M, "status": "streaming", "content": content}


def delta(seq, content="x"):
    return frames.delta(M, seq, content)


def end(status="completed"):
    return frames.generation_end(M, status, "stop", None, None)


def sent_state(generation=None, *messages):
    seq = FrameSequencer()
    seq.state(state(*messages), generation)
    return seq


def test_frames_before_the_state_are_held_and_released_after_it_in_order():
    seq = FrameSequencer()
    assert seq.hold(delta(1)) and seq.hold(delta(2))
    frame = seq.state(state(streaming_row()), frames.snapshot(M, "", 0))
    assert frame["type"] == "state" and frame["generation"]["seq"] == 0
    released = []
    while (held := seq.next_held()) is not None:
        released.append((held["seq"], seq.decide(held)))
    assert released == [(1, Action.SEND), (2, Action.SEND)]
    assert not seq.hold(delta(3))


def test_the_state_carries_the_snapshot_text_in_the_streaming_message():
    seq = FrameSequencer()
    frame = seq.state(state(streaming_row("checkpoint")), frames.snapshot(M, "live text", 4))
    assert frame["messages"][0]["content"] == "live text"


def test_a_late_joiner_drops_the_deltas_its_state_already_includes():
    seq = sent_state(frames.snapshot(M, "abc", 3), streaming_row())
    assert [seq.decide(delta(n)) for n in (2, 3, 4)] == [Action.DROP, Action.DROP, Action.SEND]


def test_a_duplicate_delta_is_dropped():
    seq = sent_state(None)
    assert seq.decide(delta(1)) is Action.SEND
    assert seq.decide(delta(1)) is Action.DROP


def test_a_gap_asks_for_a_resync_and_holds_the_delta_that_showed_it():
    seq = sent_state(None)
    assert seq.decide(delta(1)) is Action.SEND
    assert seq.decide(delta(3)) is Action.RESYNC
    assert not seq.state_sent
    assert seq.decide(delta(4)) is Action.HOLD
    seq.begin_resync(forget_positions=True)
    seq.state(state(streaming_row()), frames.snapshot(M, "ab", 2))
    decided = []
    while (held := seq.next_held()) is not None:
        decided.append((held["seq"], seq.decide(held)))
    assert decided == [(3, Action.SEND), (4, Action.SEND)]


def test_a_gap_among_held_frames_keeps_the_rest_held_for_the_next_state():
    seq = FrameSequencer()
    for n in (1, 3, 4):
        seq.hold(delta(n))
    seq.state(state(streaming_row()), frames.snapshot(M, "", 0))
    assert seq.decide(seq.next_held()) is Action.SEND
    assert seq.decide(seq.next_held()) is Action.RESYNC
    assert seq.next_held() is None  # waiting for the fresh state
    seq.state(state(streaming_row()), frames.snapshot(M, "ab", 2))
    assert [f["seq"] for f in iter(seq.next_held, None)] == [3, 4]


def test_deltas_of_a_message_final_in_the_state_are_dropped():
    seq = sent_state(None, {"id": M, "status": "cancelled", "content": "done"})
    assert seq.decide(delta(7)) is Action.DROP


def test_a_state_taken_from_a_checkpoint_drops_deltas_of_unknown_position():
    seq = sent_state(frames.snapshot(M, "checkpoint", None), streaming_row())
    assert seq.decide(delta(5)) is Action.DROP
    assert seq.last_seq(M) is None


def test_generation_end_is_sent_once_even_when_it_comes_twice():
    seq = sent_state(None)
    assert seq.decide(end()) is Action.SEND
    assert seq.decide(end()) is Action.DROP


def test_an_interrupted_end_is_sent_then_asks_for_a_resync():
    seq = sent_state(None)
    assert seq.decide(end("interrupted")) is Action.SEND_THEN_RESYNC


def test_other_frames_pass_through_once_the_state_is_sent():
    seq = sent_state(None)
    for frame in (frames.user_message({"id": "u"}, {"id": "c"}),
                  frames.generation_start({"id": M}), frames.conversation_deleted(M)):
        assert seq.decide(frame) is Action.SEND
