import time, uuid, pytest
from chat.models import Message, UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)

async def test_stop(alice, upstream, connect):
    ok, code, ws = await connect(alice)
    assert ok
    state = await ws.receive()
    assert state["type"] == "state"
    await ws.send({"type": "message", "content": "Tell me about streaming"})
    start = await ws.receive_type("generation.start")
    mid = start["message"]["id"]
    while len(ws.deltas()) < 3:
        await ws.receive()
    t = time.monotonic()
    await ws.send({"type": "stop"})
    end = await ws.receive_type("generation.end")
    print(end)
    req = upstream.requests[-1]
    assert upstream.wait_for(lambda: req.client_closed_at is not None, 2)
    print("close latency", req.client_closed_at - t, req.chunks_written)
    from asgiref.sync import sync_to_async
    m = await Message.objects.aget(id=mid)
    assert m.status == "cancelled"
    assert m.content == ws.text(mid)
    u = await UsageRecord.objects.aget(message_id=mid)
    assert u.estimated
