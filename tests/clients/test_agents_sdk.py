"""The OpenAI Agents SDK (`openai-agents`) running an agent with one function tool against our
/v1/responses, with its default model class (`OpenAIResponsesModel`) pointed at llm-api and
the built-in SmolLM2: the first turn must call the tool (`tool_choice="required"`), the SDK
runs it and sends the `function_call_output` back (with the whole conversation, or only with
`previous_response_id`), and the model's text is the final output.

The SDK sends what OpenAI accepts and we translate nothing for: `include: []`, `store` when
set, and our responses carry what its parsers read. Tracing is off (it would post to OpenAI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RunContextWrapper,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.conftest import MODEL, LiveServer

pytestmark = pytest.mark.model


@pytest.fixture
async def client(tool_server: LiveServer, base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    set_tracing_disabled(True)
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=tool_server.api_key, max_retries=0
    ) as c:
        yield c


def weather_agent(client: openai.AsyncOpenAI, calls: list[str], **settings: Any) -> Agent[Any]:
    async def only_until_called(ctx: RunContextWrapper[Any], agent: Any) -> bool:
        # The 135M model, offered the tool again, may call it again: once it has answered, the
        # next turn is text (the SDK resets tool_choice after a call; this makes it certain).
        return not calls

    @function_tool(is_enabled=only_until_called)
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 degrees in {city}."

    return Agent(
        name="weather",
        instructions="You answer questions about the weather. Use the tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=200,
            **settings,
        ),
    )


@pytest.mark.parametrize("chained", [False, True], ids=["whole_input", "previous_response_id"])
async def test_agent_calls_its_tool_then_answers(client: openai.AsyncOpenAI, chained: bool) -> None:
    """`chained`: the SDK's server-side conversation (`auto_previous_response_id`): its second
    turn sends only the tool's output and the first response's id, so the model hears of the
    question and its call only through our stored response."""
    calls: list[str] = []
    result = await Runner.run(
        weather_agent(client, calls),
        "What is the weather in Paris?",
        max_turns=3,
        auto_previous_response_id=chained,
    )
    assert len(calls) == 1 and calls[0]
    assert isinstance(result.final_output, str) and result.final_output.strip()
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"
    # Two model turns, each one of our stored responses.
    assert len(result.raw_responses) == 2
    second = result.raw_responses[1]
    assert second.response_id is not None and second.response_id.startswith("resp_")
    stored = await client.responses.retrieve(second.response_id)
    assert stored.output_text == result.final_output
    first = result.raw_responses[0].response_id
    assert stored.previous_response_id == (first if chained else None)
    items = await client.responses.input_items.list(second.response_id, order="asc")
    kinds = [item.type for item in items.data]
    assert kinds == ["message", "function_call", "function_call_output"]


async def test_agent_streamed(client: openai.AsyncOpenAI) -> None:
    calls: list[str] = []
    run = Runner.run_streamed(
        weather_agent(client, calls, store=False), "Weather in Oslo?", max_turns=3
    )
    kinds = [event.type async for event in run.stream_events()]
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert len(calls) == 1
    assert isinstance(run.final_output, str) and run.final_output.strip()
