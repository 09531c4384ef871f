"""The training loop: LoRA on the top layers of the base model, PyTorch on CPU.

Synchronous and self-contained (the runner calls it in a thread): it reports each step, saves a
checkpoint every `checkpoint_every` steps and at the end, resumes from a checkpoint it is given,
and stops between steps when `should_stop()` says so (cancel, or the lease lost).

Why these choices (measured, docs/fine-tuning.md): LoRA on the top `lora_layers` layers only,
so the backward pass stops there instead of running through all 30; logits only at the answer's
positions (the 49k-word output layer is a fifth of the model); one thread by default on a busy
machine. The batch order is a pure function of (seed, epoch), so a resumed job sees the same
batches it would have.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_api.services.fine_tuning.adapter_gguf import write_lora_gguf
from llm_api.services.fine_tuning.dataset import TokenizedExample
from llm_api.services.fine_tuning.weights import load_base_model

BASE_LEARNING_RATE = 1e-3
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


@dataclass(slots=True)
class TrainSpec:
    gguf: Path
    cache_dir: Path
    workdir: Path
    examples: list[TokenizedExample]
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    threads: int = 1
    checkpoint_every: int = 10
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_layers: int = 10  # the top layers that get adapters

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch


@dataclass(slots=True)
class StepReport:
    step: int  # 1-based
    total_steps: int
    loss: float
    tokens: int  # tokens in this step's batch (prompt and answer)


@dataclass(slots=True)
class TrainResult:
    adapter: Path | None  # None when stopped before the end
    steps: int
    trained_tokens: int
    losses: list[float] = field(default_factory=list)


def batch_indices(spec: TrainSpec, step: int) -> list[int]:
    """The examples of 0-based `step`: a permutation per epoch, seeded by (seed, epoch)."""
    import torch

    epoch, index = divmod(step, spec.steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed * 1000 + epoch)
    order = torch.randperm(len(spec.examples), generator=gen).tolist()
    return order[index * spec.batch_size : (index + 1) * spec.batch_size]


def _batch(examples: list[TokenizedExample], pad: int) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt + e.answer
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def _loss(model: Any, ids: Any, labels: Any, mask: Any) -> Any:
    """Next-token cross-entropy over the answers only, computing the output layer only there."""
    import torch

    hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    chosen = target != IGNORE
    logits = model.base_model.model.lm_head(hidden[:, :-1][chosen])
    return torch.nn.functional.cross_entropy(logits.float(), target[chosen])


def checkpoint_path(workdir: Path, step: int) -> Path:
    return workdir / f"checkpoint-{step}.pt"


def train(
    spec: TrainSpec,
    *,
    resume_from: Path | None,
    on_step: Callable[[StepReport], None],
    on_checkpoint: Callable[[int, Path, dict[str, float]], None],
    should_stop: Callable[[], bool],
    pad_token: int = 0,
) -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    base, config = load_base_model(spec.gguf, spec.cache_dir)
    n_layers = config["num_hidden_layers"]
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        layers_to_transform=list(range(max(0, n_layers - spec.lora_layers), n_layers)),
    )
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=BASE_LEARNING_RATE * spec.learning_rate_multiplier, weight_decay=0.0
    )
    start, tokens = 0, 0
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        model.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start, tokens = int(state["step"]), int(state["tokens"])
    result = TrainResult(adapter=None, steps=start, trained_tokens=tokens)
    model.train()

    def save(step: int, loss: float) -> None:
        lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        path = checkpoint_path(spec.workdir, step)
        tmp = path.with_suffix(".tmp")
        state = {"step": step, "tokens": result.trained_tokens, "lora": lora_state}
        torch.save({**state, "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, path)
        on_checkpoint(step, path, {"train_loss": loss, "trained_tokens": result.trained_tokens})

    loss_value = float("nan")
    for step in range(start, spec.total_steps):
        if should_stop():
            return result
        batch = [spec.examples[i] for i in batch_indices(spec, step)]
        ids, labels, mask = _batch(batch, pad_token)
        loss = _loss(model, ids, labels, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        n_tokens = int(mask.sum())
        result.steps, result.trained_tokens = step + 1, result.trained_tokens + n_tokens
        result.losses.append(loss_value)
        on_step(StepReport(step + 1, spec.total_steps, loss_value, n_tokens))
        if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.total_steps:
            save(step + 1, loss_value)
    lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    adapter = spec.workdir / "adapter.gguf"
    tmp = spec.workdir / "adapter.gguf.tmp"
    write_lora_gguf(tmp, lora_state, spec.lora_alpha, config)
    os.replace(tmp, adapter)
    result.adapter = adapter
    return result
