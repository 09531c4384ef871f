"""Agent frameworks against llm-api, as their users run them: LangChain (`bind_tools`, and an
agent loop — the model calls a tool, gets the result, answers), pydantic-ai with its default
tool-based structured output, and the Vercel AI SDK's tool loop from Node. Each runs against a
gateway model whose scripted upstream calls tools as OpenAI does, and against the built-in
SmolLM2 with the tool call forced.

Run: PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests/clients"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from pydantic_ai import Agent
from pydantic_ai.messages import RetryPromptPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.clients.conftest import STUB_MODEL
from tests.clients.tool_upstream import ScriptedCall, ToolScript, ToolUpstream, call_id
from tests.conftest import IN_CI, MODEL, LiveServer

pytestmark = pytest.mark.model

NODE_DIR = Path(__file__).parent / "node"
PARIS = ScriptedCall("get_weather", '{"city": "Paris", "unit": "celsius"}')


class CityWeather(BaseModel):
    city: str = Field(max_length=40)
    temperature_c: int
    sky: Literal["sunny", "cloudy", "rainy"]


def weather_tool(ran: list[dict[str, Any]]) -> Any:
    @tool
    def get_weather(
        city: Annotated[str, Field(max_length=40)],
        unit: Literal["celsius", "fahrenheit"] = "celsius",
    ) -> str:
        """Current weather in a city."""
        ran.append({"city": city, "unit": unit})
        return f"21 degrees {unit} and sunny in {city}"

    return get_weather


def chat_model(server: LiveServer, base_url: str, model: str, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=base_url, api_key=server.api_key, max_retries=0, **kw)


# --- LangChain -----------------------------------------------------------------------------------


def test_langchain_bind_tools_invoke_and_stream(
    tool_server: LiveServer, gateway_url: str, script: ToolUpstream
) -> None:
    script.script = ToolScript(calls=[PARIS], piece=2)
    bound = chat_model(tool_server, gateway_url, STUB_MODEL).bind_tools(
        [weather_tool([])], tool_choice="get_weather"
    )
    message = bound.invoke("Weather in Paris?")
    assert isinstance(message, AIMessage)
    expected_id = call_id(script.recorded.bodies[0], 0, PARIS)
    expected = [
        {
            "name": "get_weather",
            "args": {"city": "Paris", "unit": "celsius"},
            "id": expected_id,
            "type": "tool_call",
        }
    ]
    assert message.tool_calls == expected
    assert message.response_metadata["finish_reason"] == "tool_calls"

    merged: AIMessageChunk | None = None
    for chunk in bound.stream("Weather in Paris?"):
        merged = chunk if merged is None else merged + chunk  # type: ignore[assignment]
    assert merged is not None and merged.tool_calls == expected
    assert not merged.invalid_tool_calls
    sent = script.recorded.bodies[0]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("streaming", [False, True], ids=["invoke", "streaming"])
def test_langchain_agent_loop_through_the_gateway(
    tool_server: LiveServer, gateway_url: str, script: ToolUpstream, streaming: bool
) -> None:
    script.script = ToolScript(calls=[PARIS])
    ran: list[dict[str, Any]] = []
    agent = create_agent(
        chat_model(tool_server, gateway_url, STUB_MODEL, streaming=streaming), [weather_tool(ran)]
    )
    state = agent.invoke(
        {"messages": [{"role": "user", "content": f"Weather in Paris? {streaming}"}]}
    )
    assert ran == [{"city": "Paris", "unit": "celsius"}]
    messages = state["messages"]
    [tool_message] = [m for m in messages if isinstance(m, ToolMessage)]
    assert tool_message.content == "21 degrees celsius and sunny in Paris"
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content == "Tool results: 21 degrees celsius and sunny in Paris"

    # The second model call carried the call and its result, as OpenAI expects them.
    first, second = script.recorded.bodies
    call = second["messages"][-2]["tool_calls"][0]
    assert call["id"] == call_id(first, 0, PARIS)
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "21 degrees celsius and sunny in Paris",
    }


def test_langchain_agent_loop_on_the_local_model(tool_server: LiveServer, base_url: str) -> None:
    """A 135M model rarely chooses a tool by itself: the first step forces the call
    (`required`), the step after the result forbids another (`none`), so the loop is
    deterministic — call, result, answer."""

    @wrap_model_call
    def call_then_answer(request: ModelRequest, handler: Any) -> ModelResponse:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "required"))

    ran: list[dict[str, Any]] = []
    model = chat_model(tool_server, base_url, MODEL, temperature=0, max_tokens=120)
    agent = create_agent(model, [weather_tool(ran)], middleware=[call_then_answer])
    state = agent.invoke({"messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert len(ran) == 1 and ran[0]["unit"] in ("celsius", "fahrenheit"), ran
    messages = state["messages"]
    assert [type(m).__name__ for m in messages] == [
        "HumanMessage",
        "AIMessage",
        "ToolMessage",
        "AIMessage",
    ]
    call = messages[1].tool_calls[0]
    assert call["name"] == "get_weather" and messages[2].tool_call_id == call["id"]
    final = messages[-1]
    assert not final.tool_calls and isinstance(final.content, str) and final.content.strip()


# --- pydantic-ai ---------------------------------------------------------------------------------


def pydantic_agent(server: LiveServer, base_url: str, model: str) -> Agent[None, CityWeather]:
    provider = OpenAIProvider(base_url=base_url, api_key=server.api_key)
    return Agent(OpenAIChatModel(model, provider=provider), output_type=CityWeather, retries=0)


async def test_pydantic_ai_tool_output_through_the_gateway(
    tool_server: LiveServer, gateway_url: str, script: ToolUpstream
) -> None:
    script.script = ToolScript(
        calls=[
            ScriptedCall("final_result", '{"city": "Paris", "temperature_c": 21, "sky": "sunny"}')
        ]
    )
    agent = pydantic_agent(tool_server, gateway_url, STUB_MODEL)
    expected = CityWeather(city="Paris", temperature_c=21, sky="sunny")
    result = await agent.run("Weather in Paris as an object")
    assert result.output == expected
    async with agent.run_stream("Weather in Paris as an object, streamed") as streamed:
        assert await streamed.get_output() == expected
    for body in script.recorded.bodies:
        [output_tool] = body["tools"]
        assert output_tool["function"]["name"] == "final_result"
        assert body["tool_choice"] in (
            "required",
            {"type": "function", "function": {"name": "final_result"}},
        )


async def test_pydantic_ai_tool_output_from_the_local_model(
    tool_server: LiveServer, base_url: str
) -> None:
    """The tool call is forced (pydantic-ai asks for `required` when only a tool may end the
    run), so the grammar makes the object valid on the first try: no retry was needed."""
    agent = pydantic_agent(tool_server, base_url, MODEL)
    result = await agent.run("The weather in Paris: 21 degrees and sunny.")
    assert isinstance(result.output, CityWeather)
    retries = [p for m in result.all_messages() for p in m.parts if isinstance(p, RetryPromptPart)]
    assert retries == []


# --- the Vercel AI SDK (Node) --------------------------------------------------------------------


def node_ready() -> str:
    """The node binary, with the package's dependencies installed (`npm ci` from the lock)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if IN_CI:
            pytest.fail("node and npm are required in CI")
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return node


def run_node(node: str, base_url: str, api_key: str, model: str, *args: str) -> dict[str, Any]:
    """Run node/tool_clients.mjs; its JSON report."""
    env = {
        **os.environ,
        "LLM_API_BASE_URL": base_url,
        "LLM_API_KEY": api_key,
        "LLM_API_MODEL": model,
    }
    run = subprocess.run(
        [node, "tool_clients.mjs", *args],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return report


def test_vercel_ai_sdk_tool_loop_through_the_gateway(
    tool_server: LiveServer, gateway_url: str, script: ToolUpstream
) -> None:
    node = node_ready()
    tokyo = ScriptedCall("get_weather", '{"city": "Tokyo"}')
    script.script = ToolScript(calls=[ScriptedCall("get_weather", '{"city": "Paris"}'), tokyo])
    out = run_node(node, gateway_url, tool_server.api_key, STUB_MODEL)
    answer = "Tool results: 21 C and sunny in Paris; 21 C and sunny in Tokyo"
    for name in ("generateText", "streamText", "openaiChat"):
        flow = out[name]
        assert flow["calls"] == ["Paris", "Tokyo"], (name, flow)
        assert flow["finishReasons"] == ["tool-calls", "stop"], (name, flow)
        assert [c["input"] for c in flow["toolCalls"]] == [{"city": "Paris"}, {"city": "Tokyo"}]
        assert flow["text"] == answer, (name, flow)
    assert out["streamText"]["streamed"] == answer
    # Each flow's second request carried both calls and both results.
    seconds = [b for b in script.recorded.bodies if b["messages"][-1]["role"] == "tool"]
    assert len(seconds) == 3
    for body in seconds:
        results = [m for m in body["messages"] if m["role"] == "tool"]
        calls = next(m for m in body["messages"] if m.get("tool_calls"))["tool_calls"]
        assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]


def test_vercel_ai_sdk_tool_loop_on_the_local_model(tool_server: LiveServer, base_url: str) -> None:
    """generateText with the first step forced to call (`required`) and the next to answer
    (`none`): the SDK parses the grammar-made call, runs the tool, and gets a text answer."""
    flow = run_node(node_ready(), base_url, tool_server.api_key, MODEL, "local")["local"]
    # `required` with parallel calls allowed: one call or more, each run once.
    assert flow["calls"] and all(flow["calls"]), flow
    assert [c["name"] for c in flow["toolCalls"]] == ["get_weather"] * len(flow["calls"]), flow
    assert flow["finishReasons"][0] == "tool-calls", flow
    assert flow["finishReasons"][1] in ("stop", "length"), flow
    assert flow["steps"] == 2 and flow["text"].strip(), flow
