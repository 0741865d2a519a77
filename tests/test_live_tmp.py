import asyncio, json, pytest, websockets, uuid
from tests.conftest import session_cookie
pytestmark = pytest.mark.django_db(transaction=True)

async def test_live(alice, asgi_server, upstream):
    from asgiref.sync import sync_to_async
    cookie = await sync_to_async(session_cookie)(alice)
    async with websockets.connect(f"{asgi_server.ws_url}/ws/conversations/{uuid.uuid4()}/", additional_headers={"Cookie": cookie, "Origin": asgi_server.url}) as ws:
        print(json.loads(await ws.recv())["type"])
        await ws.send(json.dumps({"type":"message","content":"hello there"}))
        n=0
        while True:
            f=json.loads(await ws.recv()); 
            if f["type"]=="delta": n+=1
            if n==3: await ws.send(json.dumps({"type":"stop"}))
            if f["type"]=="generation.end": print(f); break
    assert upstream.wait_for(lambda: upstream.requests[-1].client_closed_at, 2)
