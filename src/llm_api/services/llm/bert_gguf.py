"""Turn a sentence-transformers BERT model directory (safetensors, config.json, vocab.txt, the
pooling config) into a GGUF that llama.cpp runs, once, cached outside the repository.

llama.cpp's own `convert_hf_to_gguf.py` needs torch and transformers and is not shipped in the
llama-cpp-python wheel; this is the same mapping for the one architecture we need (BERT), written
with the `gguf` package (which owns the tensor-name table and the metadata keys) and safetensors'
numpy loader. What it writes follows llama.cpp's converter: `bert` architecture, non-causal
attention, the pooling type from the sentence-transformers Pooling module, the WordPiece vocabulary
in llama.cpp's "phantom space" form, matrices in F16 and vectors/norms/position tables in F32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the output of `convert` changes, so cached files are rebuilt.
CONVERTER_VERSION = "1"


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def pooling_of(model_dir: Path) -> str:
    """`mean` or `cls`, from the sentence-transformers Pooling module (as llama.cpp reads it)."""
    modules = model_dir / "modules.json"
    if modules.is_file():
        for mod in _json(modules):
            if str(mod.get("type", "")).endswith("Pooling"):
                cfg = _json(model_dir / mod["path"] / "config.json")
                if cfg.get("pooling_mode_mean_tokens"):
                    return "mean"
                if cfg.get("pooling_mode_cls_token"):
                    return "cls"
                raise ValueError(f"{model_dir}: only mean and CLS pooling are supported")
    return "cls"  # a bare BertModel: its [CLS] vector


def source_digest(model_dir: Path) -> str:
    """Content hash of everything the conversion reads (plus the converter's version)."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    names = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "modules.json"]
    files = [model_dir / n for n in names] + [model_dir / "model.safetensors"]
    pooling = model_dir / "1_Pooling" / "config.json"
    for f in [*files, pooling]:
        if not f.is_file():
            continue
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_gguf(model_dir: Path, cache_dir: Path, name: str) -> Path:
    """The GGUF for `model_dir`, converting it the first time. The file is written under a
    temporary name and renamed into place, so concurrent workers never read half a file."""
    out = cache_dir / f"{name}-{source_digest(model_dir)}.gguf"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}-", suffix=".gguf.tmp")
    os.close(fd)
    try:
        convert(model_dir, Path(tmp))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _vocab(model_dir: Path) -> tuple[list[str], list[int]]:
    """WordPiece tokens in llama.cpp's form, and their token types."""
    import gguf

    tokens = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special: set[str] = set()
    tok_json = model_dir / "tokenizer.json"
    if tok_json.is_file():
        special = {t["content"] for t in _json(tok_json).get("added_tokens", []) if t["special"]}
    else:
        special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    out, types = [], []
    for tok in tokens:
        if tok in special:
            out.append(tok)
            types.append(int(gguf.TokenType.CONTROL))
            continue
        # llama.cpp's WPM tokenizer marks word starts with U+2581 instead of marking
        # continuations with "##" (its converter's "phantom space" vocabulary).
        out.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
        types.append(int(gguf.TokenType.NORMAL))
    return out, types


def convert(model_dir: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    hp = _json(model_dir / "config.json")
    if hp.get("model_type") != "bert" or hp.get("position_embedding_type", "absolute") != (
        "absolute"
    ):
        raise ValueError(f"{model_dir}: only BERT models with absolute positions are supported")
    arch = gguf.MODEL_ARCH.BERT
    n_layers = int(hp["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, n_layers)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])

    w.add_name(model_dir.name)
    w.add_block_count(n_layers)
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_head_count(int(hp["num_attention_heads"]))
    w.add_layer_norm_eps(float(hp["layer_norm_eps"]))
    w.add_causal_attention(False)
    pooling = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS}
    w.add_pooling_type(pooling[pooling_of(model_dir)])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens, types = _vocab(model_dir)
    w.add_token_type_count(int(hp.get("type_vocab_size", 1)))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")  # WPM ignores it; it does its own BERT pre-splitting
    w.add_token_list(tokens)
    w.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # it warns that GGUF has no key for BERT's cls token
    try:
        gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    finally:
        vocab_log.setLevel(level)

    f32_tensors = {"position_embd.weight", "token_types.weight"}
    for key, data in load_file(str(model_dir / "model.safetensors")).items():
        key = key.removeprefix("bert.")
        if key == "embeddings.position_ids" or key.startswith(("pooler.", "cls.")):
            continue  # not used for embeddings (llama.cpp's converter drops them too)
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"{model_dir}: unexpected tensor {key}")
        if data.ndim <= 1 or new.endswith("_norm.weight") or new in f32_tensors:
            data = data.astype(np.float32)
        else:
            data = data.astype(np.float16)
        w.add_tensor(new, data)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
