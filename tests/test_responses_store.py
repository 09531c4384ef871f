"""Stored responses (`store`, default true) with the openai SDK's `client.responses` and the
real model, on SQLite and on PostgreSQL (required in CI): a chain by `previous_response_id`
(the second turn's prompt holds the first, its input_items the whole conversation, the first
turn's instructions not carried over), retrieve / delete / input_items with pagination,
another user's id and a `store: false` response are 404, a streamed response is stored once
complete, a function call answered through `previous_response_id` + `function_call_output`,
a team key's responses shared by the team's keys, and the retention purge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import orjson
import pytest

from llm_api.db.tables import Team
from llm_api.services.auth import api_keys
from tests.clients.support import FRESH
from tests.conftest import MODEL, Account, create_account

pytestmark = pytest.mark.model

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@dataclass
class Env:
    app: Any
    http: httpx.AsyncClient  # no credentials of its own
    client: openai.AsyncOpenAI  # the test account
    other: openai.AsyncOpenAI  # another user


def _sdk(http: httpx.AsyncClient, account: Account) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key=account.api_key,
        http_client=http,
        max_retries=0,
        default_headers={**account.headers, **FRESH},
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_app(request: pytest.FixtureRequest) -> Any:
    """The session's app (SQLite) or the same app on PostgreSQL (`pg_app`)."""
    return request.getfixturevalue("app" if request.param == "sqlite" else "pg_app")


@pytest.fixture(scope="module")
async def env(db_app: Any) -> AsyncIterator[Env]:
    """`db_app` with its test account and a second user."""
    app = db_app
    other = await create_account(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield Env(app, http, _sdk(http, app.state.test_account), _sdk(http, other))


def short(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "max_output_tokens": 8, **kw}


async def test_chain_by_previous_response_id(env: Env) -> None:
    first = await env.client.responses.create(
        **short(input="My name is Ada. Say hi.", instructions="Answer in English.")
    )
    assert first.store is True and first.previous_response_id is None
    second = await env.client.responses.create(
        **short(input="What is my name?", previous_response_id=first.id)
    )
    assert second.previous_response_id == first.id and second.instructions is None
    # The model was sent the first turn: its prompt holds the first prompt and answer.
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    items = await env.client.responses.input_items.list(second.id, order="asc")
    texts = [(i.role, i.content[0].text) for i in items.data]  # type: ignore[union-attr]
    # The first turn's instructions are not an item (and not carried over, as OpenAI).
    assert texts == [
        ("user", "My name is Ada. Say hi."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
    ]
    assert items.data[1].id == first.output[0].id
    assert items.first_id == items.data[0].id and items.has_more is False
    # OpenAI's default order is newest first; `after` and `limit` page through it.
    newest = await env.client.responses.input_items.list(second.id, limit=2)
    assert [i.id for i in newest.data] == [items.data[2].id, items.data[1].id]
    assert newest.has_more is True and newest.last_id == items.data[1].id
    rest = await env.client.responses.input_items.list(second.id, limit=2, after=newest.last_id)
    assert [i.id for i in rest.data] == [items.data[0].id] and rest.has_more is False

    fetched = await env.client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    assert fetched.usage == second.usage and fetched.previous_response_id == first.id


async def test_another_users_response_is_404_everywhere(env: Env) -> None:
    mine = await env.client.responses.create(**short(input="Hi.", metadata={"k": "v"}))
    with pytest.raises(openai.NotFoundError):
        await env.other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await env.other.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        await env.other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as exc:
        await env.other.responses.create(**short(input="Hi.", previous_response_id=mine.id))
    assert exc.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert exc.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    # Still there for its owner, as stored.
    fetched = await env.client.responses.retrieve(mine.id)
    assert fetched.metadata == {"k": "v"} and fetched.output_text == mine.output_text


async def test_a_team_keys_responses_are_the_teams(env: Env) -> None:
    """Scoped by tenant: what one of a team's keys stored, another key of the team reads; the
    same user's personal key does not (it is another tenant)."""
    account = await create_account(env.app)
    async with env.app.state.llm_api.db.sessions.begin() as db:
        team = Team(name="t")
        db.add(team)
        await db.flush()
        raws = []
        for name in ("k1", "k2"):
            key, raw = await api_keys.create_key(db, account.user_id, name)
            key.team_id = team.id
            raws.append(raw)
    first, second = (
        _sdk(env.http, Account(account.user_id, account.email, "", raw, "")) for raw in raws
    )
    personal = _sdk(env.http, account)
    resp = await first.responses.create(**short(input="Hi.", max_output_tokens=2))
    assert (await second.responses.retrieve(resp.id)).id == resp.id
    with pytest.raises(openai.NotFoundError):
        await personal.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(resp.id)


async def test_delete_then_404(env: Env) -> None:
    resp = await env.client.responses.create(**short(input="Hi."))
    # The SDK's delete returns nothing: OpenAI's deleted shape is checked on the wire.
    auth = {"Authorization": f"Bearer {env.client.api_key}"}
    raw = await env.http.delete(f"/v1/responses/{resp.id}", headers=auth)
    assert raw.status_code == 200
    assert raw.json() == {"id": resp.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.delete(resp.id)
    for odd in ("nul\x00id", "x" * 300, "ü"):  # never one of ours: 404 (not a database error)
        with pytest.raises(openai.NotFoundError):
            await env.client.responses.retrieve(odd)


async def test_store_false_keeps_nothing(env: Env) -> None:
    resp = await env.client.responses.create(**short(input="Hi.", store=False))
    assert resp.store is False
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.create(**short(input="Again.", previous_response_id=resp.id))


async def test_streamed_response_is_stored_when_complete(env: Env) -> None:
    stream = await env.client.responses.create(**short(input="Hi.", stream=True))
    events = [e async for e in stream]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.store is True
    fetched = await env.client.responses.retrieve(final.id)
    assert fetched.status == final.status and fetched.output_text == final.output_text
    # Continued at once: the stored response was written before its last event.
    nxt = await env.client.responses.create(**short(input="More.", previous_response_id=final.id))
    items = await env.client.responses.input_items.list(nxt.id, order="asc")
    assert [i.role for i in items.data] == ["user", "assistant", "user"]  # type: ignore[union-attr]


async def test_function_call_round_trip_by_previous_response_id(env: Env) -> None:
    if env.app.state.llm_api.settings.database_url:
        pytest.skip("the model's part is the same on both databases: SQLite runs it")
    first = await env.client.responses.create(
        **short(
            input="What is the weather in Paris?",
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,  # one call, then the answer stops
            max_output_tokens=200,
        )
    )
    [call] = [o for o in first.output if o.type == "function_call"][:1]
    assert call.name == "get_weather" and orjson.loads(call.arguments)["city"]
    answer = await env.client.responses.create(
        **short(
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
            tools=[WEATHER],
            tool_choice="none",  # the 135M model would call again; the answer is the point
            max_output_tokens=24,
        )
    )
    assert answer.output_text and answer.previous_response_id == first.id
    items = await env.client.responses.input_items.list(answer.id, order="asc")
    kinds = [i.type for i in items.data]
    assert kinds[0] == "message" and kinds[-1] == "function_call_output"
    assert set(kinds[1:-1]) == {"function_call"}
    assert items.data[1].call_id == items.data[-1].call_id == call.call_id  # type: ignore[union-attr]


async def test_retention_purges_old_responses(env: Env) -> None:
    resp = await env.client.responses.create(**short(input="Hi."))
    store = env.app.state.llm_api.stored_responses
    days = env.app.state.llm_api.settings.responses_retention_days
    assert await store.purge(datetime.now(UTC) + timedelta(days=days) - timedelta(hours=1)) == 0
    await env.client.responses.retrieve(resp.id)
    assert await store.purge(datetime.now(UTC) + timedelta(days=days, minutes=1)) >= 1
    with pytest.raises(openai.NotFoundError):
        await env.client.responses.retrieve(resp.id)


async def test_bad_input_items_params_are_400(env: Env) -> None:
    resp = await env.client.responses.create(**short(input="Hi."))
    with pytest.raises(openai.BadRequestError) as exc:
        await env.client.responses.input_items.list(resp.id, limit=0)
    assert exc.value.body["param"] == "limit"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await env.client.responses.input_items.list(resp.id, order="sideways")  # type: ignore[arg-type]
