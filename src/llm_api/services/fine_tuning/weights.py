"""The base model's weights for training, read from the GGUF that serving uses.

llama.cpp's converter stores attention q/k rows permuted for its RoPE layout; they are put back
in Hugging Face's order here (and a LoRA delta on them is permuted again when the adapter is
written, adapter_gguf.py). Dequantizing the GGUF costs seconds, so the float weights are kept
once in the model cache (safetensors), keyed by the GGUF's size and mtime.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from llm_api.core.private_files import private_dir

_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_PART = {v: k for k, v in _PARTS.items()}  # HF module path → GGUF tensor name part


def unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def permute(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order, from Hugging Face's."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_config(gguf: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def field(name: str) -> Any:
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"fine-tuning supports llama-architecture models, not {arch}")
    return {
        "vocab_size": int(field("llama.vocab_size")),
        "hidden_size": int(field("llama.embedding_length")),
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": int(field("llama.attention.head_count")),
        "num_key_value_heads": int(field("llama.attention.head_count_kv")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base")),
        "max_position_embeddings": int(field("llama.context_length")),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
    }


def _dequantized(gguf: Path, config: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf)
    state: dict[str, Any] = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only memory map
            w = w.copy()
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = torch.from_numpy(w)
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = torch.from_numpy(w)
        elif t.name == "output.weight":
            state["lm_head.weight"] = torch.from_numpy(w)
        else:
            _, layer, part, _ = t.name.split(".")
            if part == "attn_q":
                w = unpermute(w, config["num_attention_heads"])
            elif part == "attn_k":
                w = unpermute(w, config["num_key_value_heads"])
            key = f"model.layers.{layer}.{_PARTS[part]}.weight"
            state[key] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    return state


def _cache_file(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "fine-tuning" / f"{gguf.stem}-{key.hexdigest()[:12]}.safetensors"


def load_base_model(gguf: Path, cache_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A LlamaForCausalLM (float32, CPU) holding the GGUF's weights, and its config."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = read_config(gguf)
    cached = _cache_file(gguf, cache_dir.expanduser())
    if cached.exists():
        state = load_file(cached)
    else:
        state = _dequantized(gguf, config)
        private_dir(cached.parent)
        # A name of its own per writer, renamed into place: workers (and processes) starting
        # at once each write their own file, and none reads half of another's.
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.stem}-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(state, tmp)
            os.replace(tmp, cached)
        finally:
            Path(tmp).unlink(missing_ok=True)
    hf_config = LlamaConfig(**config, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = LlamaForCausalLM(hf_config)  # type: ignore[no-untyped-call]
    model.load_state_dict(state, strict=False, assign=True)
    if config["tie_word_embeddings"]:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(hf_config)  # a buffer, not in the GGUF
    model.requires_grad_(False)
    return model, config
