"""`python -m bench finetune`: training throughput of fine-tuning jobs on this machine.

Runs the jobs' own trainer (services/fine_tuning/trainer.py: LoRA rank 8 on the top 10 layers
of SmolLM2-135M, PyTorch on CPU) on a synthetic chat dataset, and reports trained tokens per
second (prompt and answer tokens of each batch, what the usage ledger records) per thread count,
after one warm-up step. The base weights are converted once into the model cache first, so
loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from llm_api.core.config import Settings
from llm_api.services.fine_tuning.dataset import Example, tokenize_examples, tokenizer_for
from llm_api.services.fine_tuning.trainer import StepReport, TrainSpec, train
from llm_api.services.fine_tuning.weights import load_base_model
from llm_api.services.llm.registry import builtin_registry
from llm_api.services.llm.types import Message


def dataset(n: int) -> list[Example]:
    return [
        Example(
            i,
            [Message("user", f"Question {i}: what is {i} plus {i}? Answer in one sentence.")],
            f"{i} plus {i} is {2 * i}, and that is the whole answer to question {i}.",
        )
        for i in range(n)
    ]


def run(threads: int, steps: int, batch: int, gguf: Path, cache: Path) -> dict[str, float]:
    tokenized = tokenize_examples(
        dataset(batch * steps), tokenizer_for(gguf), max_tokens=1024, param="x"
    )
    times: list[tuple[float, int]] = []
    last = [time.perf_counter()]

    def on_step(r: StepReport) -> None:
        now = time.perf_counter()
        times.append((now - last[0], r.tokens))
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        spec = TrainSpec(
            gguf=gguf,
            cache_dir=cache,
            workdir=Path(tmp),
            examples=tokenized,
            n_epochs=1,
            batch_size=batch,
            learning_rate_multiplier=1.0,
            seed=0,
            threads=threads,
            checkpoint_every=10_000,
        )
        last[0] = time.perf_counter()
        train(
            spec,
            resume_from=None,
            on_step=on_step,
            on_checkpoint=lambda *_: None,
            should_stop=lambda: False,
        )
    measured = times[1:]  # the first step pays for allocations and kernel selection
    per_step = [t / n for t, n in measured]
    return {
        "threads": threads,
        "batch_size": batch,
        "tokens_per_step": statistics.mean(n for _, n in measured),
        "tokens_per_s": sum(n for _, n in measured) / sum(t for t, _ in measured),
        "step_s_median": statistics.median(t for t, _ in measured),
        "ms_per_token_p90": sorted(per_step)[int(0.9 * (len(per_step) - 1))] * 1000,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench finetune", description=__doc__)
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    gguf = builtin_registry().models[0].gguf_path()
    cache = Settings().model_cache_dir
    load_base_model(gguf, cache)  # converts into the cache once
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    rows = [run(int(t), args.steps, args.batch_size, gguf, cache) for t in args.threads.split(",")]
    print("| threads | batch | tokens/step | tokens/s | step (median) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['batch_size']} | {r['tokens_per_step']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['step_s_median']:.2f} s |"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0
