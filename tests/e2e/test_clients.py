"""The real OpenAI SDK (sync and async) and LangChain against the live server (both engines)."""

import asyncio

import openai
import pytest

from tests.schemas import validate

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture()
def sdk(engine_server):
    return openai.OpenAI(base_url=engine_server.url, api_key="unused", max_retries=0)


def test_sdk_chat_and_completion(sdk):
    r = sdk.chat.completions.create(model="succ", messages=MSGS)
    assert r.choices[0].message.content == "Hi there!"
    assert r.usage.total_tokens == 9
    validate("chat_completion", r.model_dump(exclude_unset=True))
    c = sdk.completions.create(model="succ", prompt="x", max_tokens=5)
    assert c.choices[0].text == "yz" and c.choices[0].finish_reason == "stop"


def test_sdk_streaming_with_usage(sdk):
    stream = sdk.chat.completions.create(model="succ", messages=MSGS, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Hi there!"
    assert chunks[-1].usage.completion_tokens == 3
    comp = sdk.completions.create(model="succ", prompt="5", max_tokens=10, stream=True)
    assert "".join(ch.choices[0].text for ch in comp) == "6789é日 done"


def test_sdk_errors_map_to_sdk_exceptions(sdk):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model="missing-model", messages=MSGS)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model="rand", prompt="x", max_tokens=100000)
    assert err.value.code == "context_length_exceeded"
    models = sdk.models.list()
    assert "succ" in [m.id for m in models.data]
    assert sdk.models.retrieve("succ").id == "succ"


def test_async_sdk(engine_server):
    async def main():
        client = openai.AsyncOpenAI(base_url=engine_server.url, api_key="unused", max_retries=0)
        results = await asyncio.gather(*(
            client.chat.completions.create(model="succ", messages=MSGS) for _ in range(4)))
        stream = await client.completions.create(model="succ", prompt="a", max_tokens=3, stream=True)
        text = "".join([ch.choices[0].text async for ch in stream])
        await client.close()
        return results, text

    results, text = asyncio.run(main())
    assert [r.choices[0].message.content for r in results] == ["Hi there!"] * 4
    assert text == "bcd"


def test_langchain_chat_and_llm(engine_server):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(model="succ", base_url=engine_server.url, api_key="unused", max_retries=0)
    msg = chat.invoke("hello")
    assert msg.content == "Hi there!"
    assert msg.usage_metadata["output_tokens"] == 3
    assert "".join(part.content for part in chat.stream("hello")) == "Hi there!"
    llm = OpenAI(model="succ", base_url=engine_server.url, api_key="unused", max_retries=0, max_tokens=5)
    assert llm.invoke("x") == "yz"
    assert "".join(llm.stream("x")) == "yz"
