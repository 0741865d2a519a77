"""Chainlit's OpenAI streaming example, as its documentation gives it
(docs.chainlit.io, "Streaming": ``advanced-features/streaming``), for the ``chainlit``
row of ``python -m bench.throughput``.

Only three things differ from the docs: the client reads its key and base URL from
``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` (the bench's loopback upstream) instead of a
literal key, and ``model`` and ``max_tokens`` are the bench's (``CHAINLIT_BENCH_MODEL``,
``CHAINLIT_BENCH_MAX_TOKENS``: the app rows' model and ``CHAT_MAX_TOKENS``). The rest,
the sampling settings, the history kept in the user session, one ``stream_token`` per
delta and the closing ``msg.update()``, is the example's.

It needs Chainlit, which is not in requirements.txt: it runs in the virtualenv that
``bench/chainlit_env.sh`` makes (never imported by the app, the tests or CI)::

    CHAINLIT_APP_ROOT=/tmp/somewhere OPENAI_BASE_URL=http://127.0.0.1:PORT/v1 \\
        OPENAI_API_KEY=x $(bash bench/chainlit_env.sh) -m chainlit run \\
        bench/chainlit_app.py --headless --host 127.0.0.1 --port 8001

``bench.chainlit_client`` starts it that way (``CHAINLIT_APP_ROOT``: where Chainlit
writes its ``.chainlit/config.toml``, ``.files/`` and ``chainlit.md``, kept out of the
checkout) and drives it over socket.io as Chainlit's page does.
"""

import os

import chainlit as cl
from openai import AsyncOpenAI

# The docs: AsyncOpenAI(api_key="YOUR_OPENAI_API_KEY"); here the SDK's own defaults,
# OPENAI_API_KEY and OPENAI_BASE_URL, point it at the bench upstream.
client = AsyncOpenAI()


settings = {
    "model": os.environ.get("CHAINLIT_BENCH_MODEL", "gpt-3.5-turbo"),
    "temperature": 0.7,
    "max_tokens": int(os.environ.get("CHAINLIT_BENCH_MAX_TOKENS", "500")),
    "top_p": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
}


@cl.on_chat_start
def start_chat():
    cl.user_session.set(
        "message_history",
        [{"role": "system", "content": "You are a helpful assistant."}],
    )


@cl.on_message
async def main(message: cl.Message):
    message_history = cl.user_session.get("message_history")
    message_history.append({"role": "user", "content": message.content})

    msg = cl.Message(content="")

    stream = await client.chat.completions.create(
        messages=message_history, stream=True, **settings
    )

    async for part in stream:
        if token := part.choices[0].delta.content or "":
            await msg.stream_token(token)

    message_history.append({"role": "assistant", "content": msg.content})
    await msg.update()
