"""Tiny random checkpoints made with transformers, and torch reference embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
SMALL_BPE = FIXTURES / "small-bpe"
QWEN2_TOKENIZER = FIXTURES / "qwen2-tokenizer"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "MLX runs on Apple Silicon.",
    "Bonjour le monde, 你好，世界。",
    "a",
    "Embedding models map text to vectors; similar texts get similar vectors.",
]


def make_qwen2_checkpoint(
    folder: Path,
    *,
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    layers: int = 2,
    intermediate: int = 256,
    tokenizer: Path = SMALL_BPE,
    rope_theta: float = 10000.0,
    torch_dtype: str = "float32",
    max_seq_length: int | None = None,
    seed: int = 0,
):
    """Write a random Qwen2 checkpoint (HF layout) into ``folder``; return the torch model."""
    import torch
    from transformers import Qwen2Config, Qwen2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
    )
    model = Qwen2Model(config).eval()
    with torch.no_grad():
        # Random init is small; widen it so that every layer matters to the output.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.08)
    model = model.to(getattr(torch, torch_dtype))
    model.save_pretrained(folder, safe_serialization=True)
    if max_seq_length is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return model.float()


def pad_batch(token_ids: list[list[int]], mask_dtype=None):
    """Right-pad token id lists into torch (ids, attention mask) tensors of shape (B, L)."""
    import torch

    longest = max(len(seq) for seq in token_ids)
    ids = torch.zeros((len(token_ids), longest), dtype=torch.long)
    mask = torch.zeros((len(token_ids), longest), dtype=mask_dtype or torch.long)
    for row, seq in enumerate(token_ids):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def torch_qwen2_embed(model, token_ids: list[list[int]], normalize: bool = True) -> np.ndarray:
    """Bidirectional reference: Qwen2Model with a 4-D additive padding mask, then mean pooling."""
    import torch

    ids, mask = pad_batch(token_ids, mask_dtype=torch.float32)
    min_value = torch.finfo(torch.float32).min
    longest = ids.shape[1]
    additive = ((1.0 - mask)[:, None, None, :] * min_value).expand(-1, 1, longest, longest)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=additive).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    out = pooled.numpy().astype(np.float32)
    if normalize:
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
    return out
