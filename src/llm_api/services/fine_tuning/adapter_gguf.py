"""Write a trained LoRA adapter in llama.cpp's GGUF adapter format, as its
convert_lora_to_gguf.py does: `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha`, and for each adapted weight `<base tensor>.lora_a` (rank × in) and
`<base tensor>.lora_b` (out × rank). llama.cpp scales the product by alpha / rank, as PEFT does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llm_api.services.fine_tuning.weights import GGUF_PART, permute

# PEFT's names: base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight
_NAME = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight$")


def write_lora_gguf(path: Path, lora: dict[str, Any], alpha: float, config: dict[str, Any]) -> int:
    """Write `lora` (PEFT state dict of lora_A/lora_B tensors) to `path`; returns the number of
    adapted weights."""
    import gguf
    import numpy as np

    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in lora.items():
        m = _NAME.search(name)
        if m is None:
            continue
        layer, module, which = m.groups()
        base = f"blk.{layer}.{GGUF_PART[module]}.weight"
        w = tensor.detach().to("cpu").float().numpy()
        if which == "B" and module == "self_attn.q_proj":
            w = permute(w, config["num_attention_heads"])
        elif which == "B" and module == "self_attn.k_proj":
            w = permute(w, config["num_key_value_heads"])
        pairs.setdefault(base, {})[which] = np.ascontiguousarray(w, dtype=np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for base, ab in sorted(pairs.items()):
        writer.add_tensor(f"{base}.lora_a", ab["A"])
        writer.add_tensor(f"{base}.lora_b", ab["B"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(pairs)
