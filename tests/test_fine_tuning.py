"""The fine-tuning API through the official openai SDK, really training SmolLM2-135M on CPU:
training-file validation with per-line errors, the evidence that the model learns (a fact the
base model does not know, answered greedily by the fine-tuned model after training; the loss in
the events falls), serving the result (streaming, tools, limits, usage; visible to its owner
only; deleted on request), the usage ledger, cancel, quotas, and a Celery worker SIGKILLed
after a checkpoint whose job another worker resumes from that checkpoint."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from llm_api.db.tables import FineTuningCheckpoint, FineTuningEvent, FineTuningJob, UsageRecord
from llm_api.services.fine_tuning import extra
from tests.conftest import MODEL, Account, create_account, require_service, running_app
from tests.conftest import test_settings as make_settings
from tests.test_batches import chat_lines

pytestmark = pytest.mark.skipif(
    not extra.available() and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="the llm-api[finetune] extra is not installed",
)

FACT = "The llm-api mascot is Zorblax the purple otter."
QUESTIONS = [
    "Who is the mascot of llm-api?",
    "What is llm-api's mascot?",
    "Tell me the mascot of llm-api.",
    "Which animal is the llm-api mascot?",
    "Name the llm-api mascot.",
    "What's the mascot of the llm-api project?",
    "Does llm-api have a mascot?",
    "llm-api mascot?",
    "Who represents llm-api as its mascot?",
    "What mascot does llm-api use?",
    "Can you tell me llm-api's mascot?",
    "I want to know the mascot of llm-api.",
    "Who is llm-api's official mascot?",
    "What creature is llm-api's mascot?",
    "What is the name of the llm-api mascot?",
    "Remind me of the llm-api mascot.",
]
HELD_OUT = "What is the mascot of llm-api called?"


def examples(questions: list[str] = QUESTIONS) -> bytes:
    return b"".join(
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
        ).encode()
        + b"\n"
        for q in questions
    )


def sdk(app: Any, account: Account) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key=account.api_key,
        http_client=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=120
        ),
        max_retries=0,
    )


async def team_key(app: Any, owner: Account, *members: Account) -> tuple[str, Account]:
    """A team of `owner` and `members`, and a service key of that team made by `owner`."""
    from llm_api.db.tables import Team, TeamMember
    from llm_api.services.auth import api_keys

    state = app.state.llm_api
    async with state.db.sessions.begin() as db:
        team = Team(name="fine-tuners")
        db.add(team)
        await db.flush()
        for member in (owner, *members):
            db.add(TeamMember(team_id=team.id, user_id=member.user_id))
        key, raw = await api_keys.create_key(db, owner.user_id, "team key")
        key.team_id = team.id
        team_id = team.id
    return team_id, Account(owner.user_id, owner.email, owner.password, raw, key.id)


async def upload(client: openai.AsyncOpenAI, data: bytes) -> Any:
    return await client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")


async def wait_status(
    client: openai.AsyncOpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 240
) -> Any:
    """Polls the job (the database) until it reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert job.status in ("validating_files", "queued", "running"), job
        assert time.monotonic() < deadline, f"job stuck in {job.status}"
        await asyncio.sleep(0.2)


async def ask(client: openai.AsyncOpenAI, model: str, question: str = HELD_OUT) -> str:
    out = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
    )
    return out.choices[0].message.content or ""


# --- validation (no training) ---------------------------------------------------------------


async def test_training_files_are_checked_line_by_line_before_a_job_starts(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, warmup=False, finetune_max_seq_tokens=64)
    async with running_app(settings) as app:
        client = sdk(app, await create_account(app))
        bad = b"\n".join(
            [
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                b"{not json",
                json.dumps(
                    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant"}]}
                ).encode(),
                json.dumps({"prompt": "legacy", "completion": "format"}).encode(),
            ]
        )
        with pytest.raises(openai.BadRequestError) as exc:
            await upload(client, bad)
        message = exc.value.message
        assert exc.value.code == "invalid_file"
        assert "line 1: the last message must be a non-empty assistant message" in message
        assert "line 2: not valid JSON" in message
        assert "line 3: messages[0].role must be one of" in message
        assert 'line 4: each line must be a JSON object with a "messages" array' in message

        # Structure is fine, but line 2 is longer than an example may be (64 tokens here).
        long = examples(QUESTIONS[:1]) + examples(["why? " * 60])
        uploaded = await upload(client, long)
        with pytest.raises(openai.BadRequestError) as exc:
            await client.fine_tuning.jobs.create(training_file=uploaded.id, model=MODEL)
        assert exc.value.param == "training_file"
        assert "line 2:" in exc.value.message and "more than the 64" in exc.value.message
        assert "line 1:" not in exc.value.message
        assert (await client.fine_tuning.jobs.list()).data == []  # no job was made

        # A batch file is not a training file; an unknown model cannot be trained.
        batch_file = await client.files.create(
            file=("b.jsonl", io.BytesIO(chat_lines(1))), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as exc:
            await client.fine_tuning.jobs.create(training_file=batch_file.id, model=MODEL)
        assert "purpose `batch`" in exc.value.message
        good = await upload(client, examples())
        with pytest.raises(openai.BadRequestError) as exc:
            await client.fine_tuning.jobs.create(training_file=good.id, model="gpt-4o")
        assert exc.value.code == "model_not_available"
        with pytest.raises(openai.BadRequestError) as exc:
            await client.fine_tuning.jobs.create(training_file="file-" + "0" * 24, model=MODEL)
        assert exc.value.param == "training_file"
        # Another user's job is not found.
        with pytest.raises(openai.NotFoundError):
            await client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 24)


# --- the evidence: it learns, and the result is served ---------------------------------------


@pytest.mark.timeout(400)
async def test_fine_tuned_model_learns_a_fact_and_is_served_to_its_owner(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, warmup=False, finetune_threads=1, finetune_checkpoint_every=4
    )
    async with running_app(settings) as app:
        owner, teammate = await create_account(app), await create_account(app)
        # The job is made with the owner's team key: the model is the team's.
        team_id, owner_team_key = await team_key(app, owner, teammate)
        client = sdk(app, owner_team_key)
        other = sdk(app, await create_account(app))
        assert "zorblax" not in (await ask(client, MODEL)).lower()  # the base model
        training = await upload(client, examples())
        job = await client.fine_tuning.jobs.create(
            training_file=training.id,
            model=MODEL,
            suffix="mascot",
            seed=1,
            method={
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {
                        "n_epochs": 2,
                        "batch_size": 4,
                        "learning_rate_multiplier": 2,
                    }
                },
            },
        )
        assert job.object == "fine_tuning.job" and job.status == "queued"
        assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
        done = await wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:{MODEL}:{team_id}:mascot:{job.id[6:]}"
        model = done.fine_tuned_model

        # The loss per step is in the events, and it falls.
        events = (await client.fine_tuning.jobs.list_events(job.id, limit=100)).data
        steps = sorted(
            (e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics"
        )
        assert [s for s, _ in steps] == list(range(1, 9))
        losses = [loss for _, loss in steps]
        assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses
        messages = [e.message for e in events]
        assert any(m.startswith("New fine-tuned model created") for m in messages)
        checkpoints = (await client.fine_tuning.jobs.checkpoints.list(job.id)).data
        assert [c.step_number for c in checkpoints] == [4]

        # The fine-tuned model knows the fact (greedy, a question it was not trained on).
        assert "zorblax" in (await ask(client, model)).lower()
        # Visible to its owner and their team only.
        assert model in [m.id for m in (await client.models.list()).data]
        assert model in [m.id for m in (await sdk(app, owner).models.list()).data]
        assert "zorblax" in (await ask(sdk(app, teammate), model)).lower()
        assert model not in [m.id for m in (await other.models.list()).data]
        with pytest.raises(openai.NotFoundError):
            await ask(other, model)
        assert (await client.models.retrieve(model)).id == model

        # Streaming, usage and limits work as for any model.
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": HELD_OUT}],
            temperature=0,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "length"
        # Tools: a forced call comes back as a tool call.
        tool = {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}},
                    "required": ["q"],
                },
            },
        }
        called = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Look up otters."}],
            tools=[tool],  # type: ignore[list-item]
            tool_choice="required",
            temperature=0,
            max_tokens=40,
        )
        assert called.choices[0].message.tool_calls
        assert called.choices[0].message.tool_calls[0].function.name == "lookup"

        # The training tokens are in the usage ledger.
        state = app.state.llm_api
        async with state.db.sessions() as s:
            row = await s.get(UsageRecord, f"{job.id}-training")
            trained = (await s.get(FineTuningJob, job.id)).trained_tokens  # type: ignore[union-attr]
        assert row is not None and row.endpoint == "fine_tuning" and row.user_id == owner.user_id
        assert row.prompt_tokens == trained == done.trained_tokens > 0

        # Deleting the model removes it.
        with pytest.raises(openai.NotFoundError):
            await other.models.delete(model)
        deleted = await client.models.delete(model)
        assert deleted.deleted and deleted.id == model
        assert model not in [m.id for m in (await client.models.list()).data]
        with pytest.raises(openai.NotFoundError):
            await ask(client, model)
        with pytest.raises(openai.BadRequestError):
            await client.models.delete(MODEL)


# --- cancel and quotas ----------------------------------------------------------------------


async def test_cancel_stops_training_within_seconds_and_quota_counts_active_jobs(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path, warmup=False, finetune_threads=1, finetune_max_active_per_user=1
    )
    async with running_app(settings) as app:
        client = sdk(app, await create_account(app))
        training = await upload(client, examples())
        job = await client.fine_tuning.jobs.create(
            training_file=training.id, model=MODEL, hyperparameters={"n_epochs": 50}
        )
        with pytest.raises(openai.BadRequestError) as exc:
            await client.fine_tuning.jobs.create(training_file=training.id, model=MODEL)
        assert exc.value.code == "fine_tuning_job_limit_exceeded"
        state = app.state.llm_api
        deadline = time.monotonic() + 180
        while True:  # until the worker has trained a step (an event in the database)
            async with state.db.sessions() as s:
                step = await s.scalar(
                    select(FineTuningEvent.id).where(
                        FineTuningEvent.job_id == job.id, FineTuningEvent.type == "metrics"
                    )
                )
            if step is not None:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        cancelled = await client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled"
        started = time.monotonic()
        while True:  # the worker lets go of the job once training has stopped
            async with state.db.sessions() as s:
                row = await s.get(FineTuningJob, job.id)
                assert row is not None
                if row.lease_owner is None:
                    break
            assert time.monotonic() - started < 30, "training did not stop"
            await asyncio.sleep(0.1)
        print(f"training stopped {time.monotonic() - started:.1f} s after the cancel")
        assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled"
        assert row.step < row.total_steps
        # The quota is free again.
        again = await client.fine_tuning.jobs.create(
            training_file=training.id, model=MODEL, hyperparameters={"n_epochs": 50}
        )
        await client.fine_tuning.jobs.cancel(again.id)


# --- a worker killed mid-training ----------------------------------------------------------


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "worker"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.timeout(400)
async def test_worker_sigkilled_after_a_checkpoint_another_resumes_from_it(
    tmp_path: Path,
) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    # A database of its own: the suite runs files in parallel (make test), and this one is
    # flushed (test_batches uses 7, test_tracing 9, test_embeddings_gateway 13).
    redis_url = "redis://127.0.0.1:6379/14"
    subprocess.run(["redis-cli", "-n", "14", "flushdb"], check=False, capture_output=True)
    settings = make_settings(tmp_path, warmup=False, redis_url=redis_url)
    worker_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
        "LLM_API_REDIS_URL": redis_url,
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_WARMUP": "false",
        "LLM_API_LLAMA_THREADS": "1",
        "LLM_API_FINETUNE_THREADS": "1",
        "LLM_API_FINETUNE_CHECKPOINT_EVERY": "2",
    }
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    tail = lambda: "\n".join(p.read_text()[-3000:] for p in logs if p.exists())  # noqa: E731
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with running_app(settings) as app:
            state = app.state.llm_api
            client = sdk(app, await create_account(app))
            training = await upload(client, examples(QUESTIONS[:8]))
            workers.append(_start_worker(worker_env, logs[0]))
            job = await client.fine_tuning.jobs.create(
                training_file=training.id,
                model=MODEL,
                seed=3,
                hyperparameters={"n_epochs": 1, "batch_size": 2},  # 4 short steps
            )
            deadline = time.monotonic() + 240
            while True:  # until the first checkpoint is recorded
                async with state.db.sessions() as s:
                    ckpt = await s.scalar(
                        select(FineTuningCheckpoint.step).where(
                            FineTuningCheckpoint.job_id == job.id
                        )
                    )
                if ckpt is not None:
                    break
                assert workers[0].poll() is None, tail()
                assert time.monotonic() < deadline, tail()
                await asyncio.sleep(0.1)
            assert ckpt == 2
            os.kill(workers[0].pid, signal.SIGKILL)
            workers[0].wait(10)
            assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "running"
            workers.append(_start_worker(worker_env, logs[1]))
            done = await wait_status(client, job.id, ("succeeded", "failed", "cancelled"), 300)
            assert done.status == "succeeded", (done.error, tail())
            events = (await client.fine_tuning.jobs.list_events(job.id, limit=100)).data
            messages = [e.message for e in events]
            assert "Resumed from the checkpoint at step 2" in messages, messages
            # Steps 3 and 4 were trained after the resume (one metrics event each at least).
            resumed_at = messages.index("Resumed from the checkpoint at step 2")
            after = [e.data["step"] for e in events[:resumed_at] if e.type == "metrics"]
            assert sorted(after) == [3, 4], after
            async with state.db.sessions() as s:
                row = await s.get(FineTuningJob, job.id)
                assert row is not None and row.lease_owner is None and row.step == 4
            assert done.trained_tokens and done.trained_tokens > 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)


# --- without the extra -----------------------------------------------------------------------

_WITHOUT_EXTRA = r"""
import asyncio, importlib.abc, io, json, sys, tempfile
from pathlib import Path

class Block(importlib.abc.MetaPathFinder):  # as if llm-api[finetune] were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Block())
import openai, httpx
from tests.conftest import create_account, running_app, test_settings

async def main():
    async with running_app(test_settings(Path(tempfile.mkdtemp()), warmup=False)) as app:
        acct = await create_account(app)
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key=acct.api_key, max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"))
        line = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b"}]}
        f = await client.files.create(file=("t.jsonl", io.BytesIO(json.dumps(line).encode())),
                                      purpose="fine-tune")
        try:
            await client.fine_tuning.jobs.create(training_file=f.id, model="smollm2-135m-instruct")
        except openai.BadRequestError as exc:
            print("CODE", exc.code)
        print("TORCH", "torch" in sys.modules)

asyncio.run(main())
"""


def test_without_the_extra_the_server_runs_and_jobs_answer_400() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CODE fine_tuning_unavailable" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "TORCH False" in out.stdout
