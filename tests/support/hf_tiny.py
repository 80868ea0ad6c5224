"""Tiny random Hugging Face configs, models and checkpoints built in the tests (test-only: needs
torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from tests.support.tiny import VOCAB, write_tokenizer

# `hf_config`'s sizes: vocabulary, hidden, heads, kv heads, head dim, MLP, layers.
V, D, N, K, H, F, L = 64, 32, 4, 2, 8, 48, 2

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny_hf_model(arch: str, path: Path, seed: int = 0, **overrides):
    """Build, save (safetensors + tokenizer) and return a random tiny `arch` model in eval mode."""
    config_cls, model_cls = ARCHITECTURES[arch]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random norms and biases, so a layout mistake cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return model


def hf_config(arch: str = "llama", **overrides) -> transformers.PretrainedConfig:
    """A tiny transformers config (GQA by default)."""
    base = dict(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        intermediate_size=F,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        base["sliding_window"] = None
    return ARCHITECTURES[arch][0](**(base | overrides))


def hf_model(config: transformers.PretrainedConfig, seed: int = 0):
    """A causal LM of `config`, in eval mode, with every parameter N(0, 1) (norms and biases
    included)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random at a scale where layout mistakes change the logits: matrices
    N(0, 1/fan_in), norms 1 + N(0, 0.2), other vectors (biases, sink logits) N(0, 0.2)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def build_from_config(config, path: Path, kernel: str = "eager"):
    """A randomized eval-mode model of a transformers `config`, saved to `path` (config.json +
    safetensors, no tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=kernel)
    randomize(model)
    model.eval().save_pretrained(path)
    return model


def torch_logits(torch_model, ids: np.ndarray) -> np.ndarray:
    """float32 logits [B, N, V] of token ids [B, N]."""
    with torch.no_grad():
        out = torch_model(torch.tensor(ids, dtype=torch.long))
    return (out.logits if hasattr(out, "logits") else out).float().numpy()


def torch_nll(torch_model, ids: np.ndarray) -> np.ndarray:
    """Per-token NLL [N - 1] (float64) of predicting ids[1:] from ids [N]."""
    logits = torch_logits(torch_model, ids[None, :-1])[0].astype(np.float64)
    top = logits.max(axis=-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
    return lse - logits[np.arange(len(ids) - 1), ids[1:]]
