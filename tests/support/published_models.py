"""PyTorch references of two hub-published (trust_remote_code) families, and tiny random
checkpoints of them in the published layout (test-only: needs torch).

Qwen v1 (`QWenLMHeadModel`, model_type "qwen": Qwen-1.8B/7B/14B/72B) and BTLM
(`BTLMLMHeadModel`, model_type "btlm": cerebras/btlm-3b-8k-base) ship their modeling code with the
checkpoints, not in transformers. The references below were written from that published code
(float32, dense causal attention over the whole sequence, no KV cache); the parameter names are the
checkpoints' state-dict names, so a tiny model saved here is what a converter meets in the real
files, down to the Conv1D [in, out] layout of BTLM.

Sources read (public mirrors of the hub files):
  - Qwen modeling_qwen.py (final version, with `_ntk_alpha_cached_list`): ds-llo/qwcs (a
    Qwen-72B-Chat mirror) and zhangningboo/Qwen-7B (identical model code); configuration_qwen.py:
    ds-llo/qwcs;
    config.json: zhangningboo/Qwen-7B, ds-llo/qwcs (72B-Chat), mapengAdam/qianwen-72B (72B base,
    whose model.safetensors.index.json lists the weight names), alibaba/MNN llm_models/Qwen-7B-Chat.
  - BTLM: cerebras/btlm-3b-8k-base config.json (main), README and commit pages on the hub;
    modeling_btlm.py as carried by robertalanm/text-generation-inference
    (server/.../custom_modeling/btlm_modeling.py, a light port of the hub file); the hub's
    Jais modeling (same Cerebras code base, same AlibiPositionEmbeddingLayer) for `alibi_scaling`
    (BTLM's own post-"position interpolation" file was not readable here; its README states the
    same rule);
    Cerebras/modelzoo tools/checkpoint_converters/btlm_hf_cs.py and gpt2_hf_cs.py for the state-dict
    names and the Conv1D layout.

Notation: B batch, T tokens, D hidden, N heads, H head dim, F MLP width, V vocab; p is a 0-based
absolute position (0 .. T-1 in a full forward; in the published cached decode p = number of cached
tokens + offset in the chunk).

Qwen v1 forward (modeling_qwen.py)
----------------------------------
  x = wte[ids]                                   (no embedding scale, no position embedding)
  per layer (pre-norm, residual):
    h = RMSNorm(x; ln_1.weight, eps=layer_norm_epsilon)
        RMSNorm(x) = x * rsqrt(mean(x**2, -1) + eps) * weight   (normalised in float32)
    qkv = h @ c_attn.weight.T + c_attn.bias      c_attn: nn.Linear(D, 3*D), bias ALWAYS present
    q, k, v = thirds of qkv along the last axis (q first); each viewed [B, T, N, H], H = D // N
    rotary on q and k (before the cache; keys are cached rotated), half-split ("rotate_half")
      layout on the first rd = int(kv_channels * rotary_pct) dims of each head (all H when
      rotary_pct == 1.0), the rest passes through:
        inv_freq[i] = 1 / base' ** (2i / rd), i < rd/2, base' = rotary_emb_base * a ** (rd/(rd-2))
        angle[p, j] = p * inv_freq[j mod rd/2]        (cos/sin = cat(freqs, freqs))
        x_rot = x * cos + cat(-x[rd/2:rd], x[:rd/2]) * sin     (computed in float32)
      a is the dynamic-NTK alpha (1 unless use_dynamic_ntk and the length passes seq_length).
    logn (use_logn_attn): q[p] *= max(1, log(p + 1) / log(seq_length)), after rotary, query only.
    scores = q . k / sqrt(H)   ALWAYS (the config key scale_attn_weights is ignored: the attention
             module hard-codes scale_attn_weights = True); causal mask; softmax; @ v
    x = x + merge_heads(attn) @ attn.c_proj.weight.T (+ attn.c_proj.bias only if not no_bias)
    h = RMSNorm(x; ln_2.weight)
    x = x + c_proj( w1(h) * silu(w2(h)) )        F = intermediate_size // 2 (HALF the config value);
        w1 is the UP projection, w2 the GATE (silu) one; w1, w2, c_proj biases only if not no_bias
  logits = RMSNorm(x; ln_f.weight) @ lm_head.weight.T    (untied, no bias, no logit scale)
  The attention's "masked_bias" buffer and rotary inv_freq are not in the safetensors checkpoints
  (the 72B index lists none); the code ignores h.*.attn.masked_bias / rotary_emb.inv_freq if an
  older file carries them, and so should a converter.

Qwen v1 state dict (nn.Linear weights [out, in]): transformer.wte.weight [V, D];
  transformer.h.{i}.ln_1.weight [D]; transformer.h.{i}.attn.c_attn.weight [3D, D], .bias [3D];
  transformer.h.{i}.attn.c_proj.weight [D, D]; transformer.h.{i}.ln_2.weight [D];
  transformer.h.{i}.mlp.w1.weight [F, D]; transformer.h.{i}.mlp.w2.weight [F, D];
  transformer.h.{i}.mlp.c_proj.weight [D, F]; transformer.ln_f.weight [D]; lm_head.weight [V, D].
  (With no_bias false: also attn.c_proj.bias, mlp.w1.bias, mlp.w2.bias, mlp.c_proj.bias.)

Qwen v1 logn attention and dynamic NTK, exactly as modeling_qwen.py computes them
---------------------------------------------------------------------------------
  S = config seq_length (8192 in Qwen-7B and Qwen-72B base, 32768 in Qwen-72B-Chat);
  L = kv_seq_len = tokens in the cache plus tokens of this call. Positions are NOT taken from
  position_ids (computed, then unused): the rotary and logn rows used are p = L - T_call .. L - 1,
  i.e. the cache length decides.

  use_logn_attn (applied only when not training and L > S; its factor is 1 for p + 1 <= S anyway):
      logn(p) = log(p + 1) / log(S)   if p + 1 > S   else 1     (table of p + 1 = 1 .. 32767)
      q_p <- q_p * logn(p)  (after rotary, keys and values untouched) -> scores scale by logn(p).
  use_dynamic_ntk (not training):
      ntk_alpha(L) = max(1, 2 ** ceil(log2(L / S) + 1) - 1)
                   = 1 for L <= S, 3 for S < L <= 2S, 7 for 2S < L <= 4S, 15 up to 8S, ...
      base'(L)     = rotary_emb_base * ntk_alpha(L) ** (rd / (rd - 2))
      The alpha is chosen only on a call WITHOUT past_key_values (prefill/full forward), from
      L = that call's length (when an attention mask is passed and L > S: per row, from the row's
      unpadded length; generate() passes the mask only for batch > 1). Calls WITH a cache reuse
      the alpha list of the last no-cache call (`rotary_emb._ntk_alpha_cached_list`): generation
      never changes alpha after the prompt, so a short prompt keeps alpha = 1 for the whole
      generation however long it grows. When alpha changes, every position is re-rotated with
      base' (the cos/sin table is rebuilt), so in a full forward of length T > S all positions,
      early ones included, use base'(T).
  Both are gated by seq_length only; max_position_embeddings is not read by the model code.

Qwen v1 config.json keys (what the published code does with each)
-----------------------------------------------------------------
  architectures ["QWenLMHeadModel"], auto_map {AutoConfig: configuration_qwen.QWenConfig,
    AutoModelForCausalLM: modeling_qwen.QWenLMHeadModel}, model_type "qwen", transformers_version,
    tokenizer_class / tokenizer_type "QWenTokenizer": metadata, no effect on inference.
  vocab_size: rows of wte and lm_head (72B: 152064).   hidden_size: D.
  num_hidden_layers, num_attention_heads: depth, N (MHA only: no kv-head key).
  kv_channels: head dim for the rotary size and projection_size = kv_channels * N; the code splits
    qkv by hidden_size and heads by hidden_size // N, so it only works when kv_channels * N == D.
  intermediate_size: MLP width is intermediate_size // 2 (w1, w2 each [F, D]).
  layer_norm_epsilon: RMSNorm eps (1e-6; 72B base 1e-5).
  rotary_pct: fraction of each head rotated (1.0 in the configs read); rotary_emb_base: rope base
    (10000; 72B 1000000). rope_theta (72B configs only): a duplicate, NOT read by the code.
  seq_length: threshold of logn and dynamic NTK (see above).
  use_logn_attn, use_dynamic_ntk: see above (both true in Qwen-7B, both false in Qwen-72B; an older
    Qwen-7B-Chat config had seq_length 2048 and use_logn_attn false).
  no_bias: true -> no bias on attn.c_proj and mlp.w1/w2/c_proj (c_attn always has a bias).
  tie_word_embeddings: false (lm_head is its own tensor).
  scale_attn_weights: ignored (always 1/sqrt(H)).
  max_position_embeddings: not read by the model code (no effect on inference).
  bf16 / fp16 / fp32: load dtype (and "auto" flash-attn choice); no effect beyond precision.
  use_flash_attn ("auto"/bool): kernel choice only.  softmax_in_fp32: precision of the non-SDPA
    softmax only.  use_cache: returns the cache; no numeric effect.
  use_cache_quantization: true -> KV cache stored as uint8 with per-token scale/zero (changes the
    numbers; false in every release: a converter should refuse true). use_cache_kernel: CUDA kernel
    for that quantised cache (no effect when quantisation is off).
  attn_dropout_prob, emb_dropout_prob: dropout, no effect on inference.
  initializer_range: init only.  onnx_safe: unused.  (72B extras padded_vocab_size, params_dtype,
    torch_dtype, _name_or_path: not read by the model code.)

BTLM forward (modeling_btlm.py: GPT-2 code with muP, ALiBi and SwiGLU)
---------------------------------------------------------------------
  x = wte[ids] (+ wpe[p] only when position_embedding_type == "learned"; BTLM-3B is "alibi")
  x = x * mup_embeddings_scale                       (14.6)
  per layer (pre-norm LayerNorm with bias, residual):
    h = LayerNorm(x; ln_1.weight, ln_1.bias, eps=layer_norm_epsilon)
    qkv = h @ c_attn.weight + c_attn.bias   Conv1D: weight stored [in, out] = [D, 3D] (NOT
          transposed like nn.Linear); q, k, v = thirds of the output axis (q first);
          heads [B, N, T, H], H = D // N
    scores = q . k / H ** power, power = 1.0 if mup_scale_qk_dot_by_d else 0.5 (BTLM: 1/H, not
             1/sqrt(H)); no scaling at all when scale_attn_weights is false; also / (layer + 1)
             when scale_attn_by_inverse_layer_idx (false in BTLM)
    scores += alibi[n, i, j] = -(slope_n / s) * |j - i|   (i query, j key, absolute positions;
             causal keys j <= i give -(slope_n / s) * (i - j)); causal mask; softmax; @ v
    x = x + merge_heads(attn) @ attn.c_proj.weight + attn.c_proj.bias      (Conv1D [D, D])
    h = LayerNorm(x; ln_2)
    x = x + c_proj( c_fc(h) * silu(c_fc2(h)) ) (activation_function "swiglu": c_fc2 is the GATE,
        c_fc the up projection; all Conv1D [in, out] with bias: c_fc, c_fc2 [D, F], c_proj [F, D],
        F = n_inner, default 4D). Other activations (Cerebras-GPT muP: "gelu") use
        c_proj(act(c_fc(h))) with no c_fc2.
  logits = LayerNorm(x; ln_f) @ lm_head.weight.T * (mup_output_alpha * mup_width_scale)
           lm_head is TIED to wte (tie_word_embeddings absent -> True), no bias.
  ALiBi slopes are an nn.Parameter(requires_grad=False) `transformer.relative_pe.slopes` [N, 1]
  saved in the checkpoint: the model uses the stored values. They are the ALiBi paper's: for N a
  power of 2, slope_n = (2 ** (-8 / N)) ** (n + 1); otherwise the P = 2**floor(log2 N) slopes
  followed by the even-indexed ones of the 2P set, [0::2][: N - P].
  s (alibi_scaling, "position interpolation"; absent/null in the BTLM-3B config -> s = 1):
     {"type": "linear", "factor": f} -> s = f;
     {"type": "linear", "train_seq_len": Lt} -> s = max(1, K / Lt), K = key length of the call
     (cached tokens + this call's tokens), i.e. recomputed at every step from the total length.
  The GPT-2 causal mask is a buffer of n_positions rows, so the published model cannot run past
  n_positions tokens in total (the README says to raise n_positions for longer contexts).

BTLM state dict (Conv1D weights [in, out]): transformer.wte.weight [V, D];
  transformer.h.{i}.ln_1.weight/.bias [D]; transformer.h.{i}.attn.c_attn.weight [D, 3D], .bias [3D];
  transformer.h.{i}.attn.c_proj.weight [D, D], .bias [D]; transformer.h.{i}.ln_2.weight/.bias [D];
  transformer.h.{i}.mlp.c_fc.weight [D, F], .bias [F]; transformer.h.{i}.mlp.c_fc2.weight [D, F],
  .bias [F]; transformer.h.{i}.mlp.c_proj.weight [F, D], .bias [D]; transformer.ln_f.weight/.bias
  [D]; transformer.relative_pe.slopes [N, 1]; lm_head.weight [V, D] (nn.Linear [out, in]; the same
  values as wte when tied; a converter should accept its absence and fall back to wte, as
  transformers does for tied weights). "learned" models: transformer.wpe.weight [n_positions, D]
  and no relative_pe. GPT-2's causal-mask buffers transformer.h.{i}.attn.bias / .attn.masked_bias
  are not needed (Cerebras' converter writes none for BTLM); ignore them if present.

BTLM config.json keys (cerebras/btlm-3b-8k-base main; what the published code does with each)
--------------------------------------------------------------------------------------------
  _name_or_path, architectures ["BTLMLMHeadModel"], auto_map {AutoConfig:
    configuration_btlm.BTLMConfig, AutoModel: modeling_btlm.BTLMModel, AutoModelForCausalLM:
    modeling_btlm.BTLMLMHeadModel, AutoModelFor{QuestionAnswering, SequenceClassification,
    TokenClassification}: modeling_btlm.BTLMFor*},
    model_type "btlm", torch_dtype "bfloat16", transformers_version: metadata, no effect.
  vocab_size (50257), n_embd (D = 2560), n_layer (32), n_head (N = 32; MHA only).
  n_inner: MLP width F (6826); null -> 4 * n_embd.
  n_positions: size of the causal-mask buffer = longest total length (8192); no other effect with
    ALiBi (with "learned" it is also the wpe size).
  activation_function: "swiglu" (c_fc * silu(c_fc2)); otherwise a transformers ACT2FN name on c_fc.
  position_embedding_type: "alibi" (relative_pe.slopes, no wpe) or "learned" (wpe, no ALiBi).
  alibi_scaling (optional, null/absent in BTLM-3B): see s above.
  layer_norm_epsilon: LayerNorm eps (1e-5).
  mup_embeddings_scale: multiplies the embeddings (14.6).
  mup_output_alpha, mup_width_scale: logits multiplied by their product (2.22 * 0.1 = 0.222);
    mup_width_scale has no other inference effect (it sets muP learning rates in training).
  mup_scale_qk_dot_by_d: true -> scores / H instead of / sqrt(H).
  scale_attn_weights: true -> the score scaling above applies (false: no scaling at all).
  scale_attn_by_inverse_layer_idx: scores / (layer_index + 1) when true (false).
  reorder_and_upcast_attn: GPT-2's float32-upcast attention path; precision only (false).
  tie_word_embeddings: absent -> true (lm_head = wte).
  bos_token_id, eos_token_id (50256): generation only.   use_cache: no numeric effect.
  attn_pdrop, embd_pdrop, resid_pdrop: dropout, no effect on inference.
  initializer_range: init only.
  (Before the hub commit "change mup param names" the keys were embeddings_scale,
  output_logits_scale = alpha * width, scale_qk_dot_by_d and width_scale; the current code reads
  only the mup_* names.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

VOCAB = 97
SEQ_LENGTH = 512

Config = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Qwen v1
# ---------------------------------------------------------------------------------------------


def qwen_tiny_config(**overrides: Any) -> Config:
    """A tiny Qwen v1 config.json (dict) with the published key names, order and format.

    The keys are Qwen-7B's config.json plus three that later configs carry (Qwen-72B's) and the
    final model code reads (softmax_in_fp32, use_cache_kernel, use_cache_quantization).
    `overrides` replace or add keys (e.g. seq_length=16 to reach logn / dynamic NTK quickly).
    """
    config: Config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": 32,
        "intermediate_size": 128,  # the MLP width is intermediate_size // 2 = 64
        "initializer_range": 0.02,
        "kv_channels": 8,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": SEQ_LENGTH,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": SEQ_LENGTH,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": VOCAB,
    }
    config.update(overrides)
    return config


def qwen_ntk_alpha(length: int, seq_length: int) -> int:
    """modeling_qwen's `get_ntk_alpha`: max(1, 2 ** ceil(log2(length / seq_length) + 1) - 1)."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def qwen_rotary_dim(config: Config) -> int:
    """Rotated dims per head: kv_channels, or int(kv_channels * rotary_pct) when rotary_pct < 1."""
    if config["rotary_pct"] == 1.0:
        return config["kv_channels"]
    assert config["rotary_pct"] < 1
    return int(config["kv_channels"] * config["rotary_pct"])


def qwen_inv_freq(rot_dim: int, base: float, ntk_alpha: float = 1.0) -> torch.Tensor:
    """[rot_dim // 2] float32: 1 / (base * alpha ** (rd / (rd - 2))) ** (2i / rd)."""
    scaled_base = base * ntk_alpha ** (rot_dim / (rot_dim - 2))
    return 1.0 / (scaled_base ** (torch.arange(0, rot_dim, 2).float() / rot_dim))


def qwen_logn(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query factor per 0-based position p: log(p + 1) / log(seq_length) if p + 1 > seq_length
    else 1 (float32, the shape of `positions`)."""
    n = positions.to(torch.float64) + 1
    factor = torch.where(n > seq_length, torch.log(n) / math.log(seq_length), torch.ones_like(n))
    return factor.float()


def _qwen_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, N, H]; cos, sin: [T, rd]. Half-split rotation of the first rd dims, in float32."""
    rd = cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :rd], xf[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    out = rot * cos[None, :, None] + rotated * sin[None, :, None]
    return torch.cat([out, rest], dim=-1).type_as(x)


class _QwenRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class _QwenAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        d = config["hidden_size"]
        self.n_heads = config["num_attention_heads"]
        self.head_dim = d // self.n_heads
        self.c_attn = nn.Linear(d, 3 * d)  # bias always
        self.c_proj = nn.Linear(d, d, bias=not config["no_bias"])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, logn: torch.Tensor | None
    ) -> torch.Tensor:
        """x: [B, T, D]; cos, sin: [T, rd]; logn: [T] or None -> [B, T, D]."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)  # each [B, T, D]
        q = q.view(b, t, self.n_heads, self.head_dim)  # [B, T, N, H]
        k = k.view(b, t, self.n_heads, self.head_dim)
        v = v.view(b, t, self.n_heads, self.head_dim)
        q, k = _qwen_rope(q, cos, sin), _qwen_rope(k, cos, sin)
        if logn is not None:
            q = q * logn[None, :, None, None].type_as(q)
        scores = torch.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, N, T, S]
        out = torch.einsum("BNTS,BSNH->BTNH", probs, v).reshape(b, t, d)
        return self.c_proj(out)


class _QwenMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        d, f = config["hidden_size"], config["intermediate_size"] // 2
        bias = not config["no_bias"]
        self.w1 = nn.Linear(d, f, bias=bias)  # up
        self.w2 = nn.Linear(d, f, bias=bias)  # gate (silu)
        self.c_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class _QwenBlock(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        eps = config["layer_norm_epsilon"]
        self.ln_1 = _QwenRMSNorm(config["hidden_size"], eps)
        self.attn = _QwenAttention(config)
        self.ln_2 = _QwenRMSNorm(config["hidden_size"], eps)
        self.mlp = _QwenMLP(config)

    def forward(self, x, cos, sin, logn):
        x = x + self.attn(self.ln_1(x), cos, sin, logn)
        return x + self.mlp(self.ln_2(x))


class QwenReference(nn.Module):
    """Qwen v1 (`QWenLMHeadModel`) forward over a full sequence, parameters named as the hub
    checkpoints. `model(input_ids [B, T]) -> logits [B, T, V]` (float32)."""

    def __init__(self, config: Config):
        super().__init__()
        d, n = config["hidden_size"], config["num_attention_heads"]
        if config["kv_channels"] * n != d:
            raise ValueError("published Qwen code needs kv_channels * num_attention_heads == D")
        if config.get("use_cache_quantization", False):
            raise NotImplementedError("use_cache_quantization (uint8 KV cache) is not modelled")
        self.config = dict(config)
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(config["vocab_size"], d)
        self.transformer.h = nn.ModuleList(
            _QwenBlock(config) for _ in range(config["num_hidden_layers"])
        )
        self.transformer.ln_f = _QwenRMSNorm(d, config["layer_norm_epsilon"])
        self.lm_head = nn.Linear(d, config["vocab_size"], bias=False)

    def forward(self, input_ids: torch.Tensor, ntk_alpha: float | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], as a published call without past_key_values.

        ntk_alpha: None applies the published rule (dynamic NTK on: `qwen_ntk_alpha(T, S)`, off: 1);
        a number forces that alpha (as a cached decode reusing a prompt's alpha would).
        """
        cfg = self.config
        t = input_ids.shape[1]
        s = cfg["seq_length"]
        if ntk_alpha is None:
            ntk_alpha = qwen_ntk_alpha(t, s) if cfg["use_dynamic_ntk"] else 1.0
        rd = qwen_rotary_dim(cfg)
        inv_freq = qwen_inv_freq(rd, cfg["rotary_emb_base"], ntk_alpha)  # [rd/2]
        freqs = torch.outer(torch.arange(t).float(), inv_freq)  # [T, rd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, rd]
        cos, sin = emb.cos(), emb.sin()
        logn = qwen_logn(torch.arange(t), s) if cfg["use_logn_attn"] and t > s else None
        x = self.transformer.wte(input_ids)  # [B, T, D]
        for block in self.transformer.h:
            x = block(x, cos, sin, logn)
        return self.lm_head(self.transformer.ln_f(x))  # [B, T, V]


def qwen_state_dict_names(config: Config) -> list[str]:
    """The tensor names of a Qwen v1 checkpoint with this config (sorted)."""
    names = ["transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        names += [p + "ln_1.weight", p + "attn.c_attn.weight", p + "attn.c_attn.bias"]
        names += [p + "attn.c_proj.weight", p + "ln_2.weight"]
        names += [p + "mlp.w1.weight", p + "mlp.w2.weight", p + "mlp.c_proj.weight"]
        if not config["no_bias"]:
            names += [p + "attn.c_proj.bias", p + "mlp.w1.bias", p + "mlp.w2.bias"]
            names += [p + "mlp.c_proj.bias"]
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# BTLM
# ---------------------------------------------------------------------------------------------


def btlm_tiny_config(**overrides: Any) -> Config:
    """A tiny BTLM config.json (dict): cerebras/btlm-3b-8k-base's keys, order and muP values,
    sizes scaled down. `overrides` replace or add keys (e.g. alibi_scaling, tie_word_embeddings)."""
    config: Config = {
        "_name_or_path": "tiny-btlm",
        "activation_function": "swiglu",
        "architectures": ["BTLMLMHeadModel"],
        "attn_pdrop": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_btlm.BTLMConfig",
            "AutoModel": "modeling_btlm.BTLMModel",
            "AutoModelForCausalLM": "modeling_btlm.BTLMLMHeadModel",
            "AutoModelForQuestionAnswering": "modeling_btlm.BTLMForQuestionAnswering",
            "AutoModelForSequenceClassification": "modeling_btlm.BTLMForSequenceClassification",
            "AutoModelForTokenClassification": "modeling_btlm.BTLMForTokenClassification",
        },
        "bos_token_id": VOCAB - 1,
        "embd_pdrop": 0.0,
        "mup_embeddings_scale": 14.6,
        "eos_token_id": VOCAB - 1,
        "initializer_range": 0.073,
        "layer_norm_epsilon": 1e-05,
        "model_type": "btlm",
        "n_embd": 32,
        "n_head": 4,
        "n_inner": 64,
        "n_layer": 2,
        "n_positions": SEQ_LENGTH,
        "mup_output_alpha": 2.2200000000000003,
        "position_embedding_type": "alibi",
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "mup_scale_qk_dot_by_d": True,
        "torch_dtype": "float32",
        "transformers_version": "4.30.0",
        "use_cache": True,
        "vocab_size": VOCAB,
        "mup_width_scale": 0.1,
    }
    config.update(overrides)
    return config


def alibi_slopes(n_heads: int) -> list[float]:
    """The ALiBi slopes of BTLM's AlibiPositionEmbeddingLayer for `n_heads` heads."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    p = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(p) + alibi_slopes(2 * p)[0::2][: n_heads - p]


def btlm_alibi_divisor(alibi_scaling: dict | None, key_length: int) -> float:
    """s of the bias -(slope / s) * |j - i|: 1, a fixed factor, or max(1, K / train_seq_len)."""
    if alibi_scaling is None:
        return 1.0
    if alibi_scaling.get("factor") is not None:
        return float(alibi_scaling["factor"])
    train = alibi_scaling["train_seq_len"]
    return key_length / train if key_length > train else 1.0


_BTLM_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class _Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: y = x @ weight + bias, weight stored [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...I,IO->...O", x, self.weight) + self.bias


class _BTLMAttention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        d = config["n_embd"]
        self.n_heads = config["n_head"]
        self.head_dim = d // self.n_heads
        self.c_attn = _Conv1D(d, 3 * d)
        self.c_proj = _Conv1D(d, d)
        divisor = 1.0
        if config.get("scale_attn_weights", True):
            power = 1.0 if config.get("mup_scale_qk_dot_by_d", False) else 0.5
            divisor = float(self.head_dim) ** power
        if config.get("scale_attn_by_inverse_layer_idx", False):
            divisor *= layer_idx + 1
        self.divisor = divisor

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, D]; bias: [N, T, T] or None -> [B, T, D]."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)  # each [B, T, D]
        q = q.view(b, t, self.n_heads, self.head_dim)  # [B, T, N, H]
        k = k.view(b, t, self.n_heads, self.head_dim)
        v = v.view(b, t, self.n_heads, self.head_dim)
        scores = torch.einsum("BTNH,BSNH->BNTS", q, k) / self.divisor
        if bias is not None:
            scores = scores + bias[None]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, N, T, S]
        out = torch.einsum("BNTS,BSNH->BTNH", probs, v).reshape(b, t, d)
        return self.c_proj(out)


class _BTLMMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        d = config["n_embd"]
        f = config.get("n_inner") or 4 * d
        act = config.get("activation_function", "gelu_new")
        self.swiglu = act == "swiglu"
        if not self.swiglu and act not in _BTLM_ACTIVATIONS:
            raise NotImplementedError(f"activation_function {act!r}")
        self.act = None if self.swiglu else _BTLM_ACTIVATIONS[act]
        self.c_fc = _Conv1D(d, f)  # up
        if self.swiglu:
            self.c_fc2 = _Conv1D(d, f)  # gate (silu)
        self.c_proj = _Conv1D(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x)))
        return self.c_proj(self.act(self.c_fc(x)))


class _BTLMBlock(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        d, eps = config["n_embd"], config.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = _BTLMAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = _BTLMMLP(config)

    def forward(self, x, bias):
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


class _AlibiSlopes(nn.Module):
    def __init__(self, n_heads: int):
        super().__init__()
        slopes = torch.tensor(alibi_slopes(n_heads)).unsqueeze(-1)  # [N, 1]
        self.slopes = nn.Parameter(slopes, requires_grad=False)


class BTLMReference(nn.Module):
    """BTLM (`BTLMLMHeadModel`) forward over a full sequence, parameters named as the hub
    checkpoint. `model(input_ids [B, T]) -> logits [B, T, V]` (float32)."""

    def __init__(self, config: Config):
        super().__init__()
        if config.get("add_cross_attention", False):
            raise NotImplementedError("add_cross_attention")
        pos_type = config.get("position_embedding_type", "learned")
        if pos_type not in ("alibi", "learned"):
            raise NotImplementedError(f"position_embedding_type {pos_type!r}")
        self.config = dict(config)
        d, v = config["n_embd"], config["vocab_size"]
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(v, d)
        if pos_type == "learned":
            self.transformer.wpe = nn.Embedding(config["n_positions"], d)
        self.transformer.h = nn.ModuleList(_BTLMBlock(config, i) for i in range(config["n_layer"]))
        self.transformer.ln_f = nn.LayerNorm(d, eps=config.get("layer_norm_epsilon", 1e-5))
        if pos_type == "alibi":
            self.transformer.relative_pe = _AlibiSlopes(config["n_head"])
        self.lm_head = nn.Linear(d, v, bias=False)
        if config.get("tie_word_embeddings", True):
            self.lm_head.weight = self.transformer.wte.weight

    def alibi_bias(self, t: int) -> torch.Tensor:
        """[N, T, T]: -(slope_n / s) * |j - i| for query i, key j of a length-T call."""
        pos = torch.arange(t)
        distance = (pos[None, :] - pos[:, None]).abs().float()  # [T, T]
        s = btlm_alibi_divisor(self.config.get("alibi_scaling"), t)
        slopes = self.transformer.relative_pe.slopes  # [N, 1]
        return (slopes / -s)[:, :, None] * distance[None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], as a published call without past_key_values."""
        cfg = self.config
        t = input_ids.shape[1]
        if t > cfg["n_positions"]:
            raise ValueError(f"{t} tokens > n_positions {cfg['n_positions']}")
        x = self.transformer.wte(input_ids)  # [B, T, D]
        if hasattr(self.transformer, "wpe"):
            x = x + self.transformer.wpe(torch.arange(t))[None]
        x = x * float(cfg.get("mup_embeddings_scale", 1.0))
        bias = self.alibi_bias(t) if hasattr(self.transformer, "relative_pe") else None
        for block in self.transformer.h:
            x = block(x, bias)
        logits = self.lm_head(self.transformer.ln_f(x))  # [B, T, V]
        scale = cfg.get("mup_output_alpha", 1.0) * cfg.get("mup_width_scale", 1.0)
        return logits * float(scale)


def btlm_state_dict_names(config: Config) -> list[str]:
    """The tensor names of a BTLM checkpoint with this config (sorted; lm_head.weight included)."""
    names = ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    names.append("lm_head.weight")
    if config.get("position_embedding_type", "learned") == "alibi":
        names.append("transformer.relative_pe.slopes")
    else:
        names.append("transformer.wpe.weight")
    swiglu = config.get("activation_function", "gelu_new") == "swiglu"
    mlp = ["c_fc", "c_fc2", "c_proj"] if swiglu else ["c_fc", "c_proj"]
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        for sub in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2"] + [f"mlp.{m}" for m in mlp]:
            names += [p + sub + ".weight", p + sub + ".bias"]
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomize(model: nn.Module, embed_std: float) -> None:
    """Random everything: norms 1 + 0.2 randn, biases 0.2 randn, matrices randn / sqrt(fan_in),
    embeddings embed_std * randn; ALiBi slopes keep their published values."""
    tied = model.transformer.wte.weight
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.copy_(embed_std * torch.randn_like(module.weight))
        elif isinstance(module, nn.Linear) and module.weight is not tied:
            fan_in = module.weight.shape[1]
            module.weight.copy_(torch.randn_like(module.weight) / math.sqrt(fan_in))
        elif isinstance(module, _Conv1D):
            fan_in = module.weight.shape[0]
            module.weight.copy_(torch.randn_like(module.weight) / math.sqrt(fan_in))
        elif isinstance(module, (nn.LayerNorm, _QwenRMSNorm)):
            module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
        if isinstance(module, (nn.Linear, _Conv1D, nn.LayerNorm)) and module.bias is not None:
            module.bias.copy_(0.2 * torch.randn_like(module.bias))


def _save(model: nn.Module, config: Config, path: Path, drop: tuple[str, ...] = ()) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {  # clones: tied tensors share storage, which save_file refuses
        k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_qwen(path: str | Path, seed: int = 0, **overrides: Any) -> QwenReference:
    """Write a tiny random Qwen v1 checkpoint (config.json + model.safetensors, published names,
    no tokenizer) to `path` and return its reference (eval mode). `overrides`: config keys."""
    config = qwen_tiny_config(**overrides)
    torch.manual_seed(seed)
    model = QwenReference(config)
    _randomize(model, embed_std=1.0)
    _save(model, config, Path(path))
    return model.eval()


def build_tiny_btlm(
    path: str | Path,
    seed: int = 0,
    *,
    save_lm_head: bool = True,
    perturb_slopes: bool = False,
    **overrides: Any,
) -> BTLMReference:
    """Write a tiny random BTLM checkpoint (config.json + model.safetensors, published names and
    Conv1D [in, out] layout, no tokenizer) to `path` and return its reference (eval mode).

    save_lm_head: store lm_head.weight (a copy of wte when tied); False leaves it out, as a tied
    checkpoint may. perturb_slopes: scale each stored ALiBi slope by 1 + 0.2 * rand, so a converter
    that recomputes the slopes instead of reading `transformer.relative_pe.slopes` shows.
    `overrides`: config keys.
    """
    config = btlm_tiny_config(**overrides)
    torch.manual_seed(seed)
    model = BTLMReference(config)
    _randomize(model, embed_std=0.5)
    if perturb_slopes and hasattr(model.transformer, "relative_pe"):
        slopes = model.transformer.relative_pe.slopes
        with torch.no_grad():
            slopes.mul_(1 + 0.2 * torch.rand_like(slopes))
    _save(model, config, Path(path), drop=() if save_lm_head else ("lm_head.weight",))
    return model.eval()


def load_reference(path: str | Path) -> QwenReference | BTLMReference:
    """The reference (eval mode) of a Qwen v1 or BTLM folder (config.json + model.safetensors)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    cls = {"qwen": QwenReference, "btlm": BTLMReference}[config["model_type"]]
    model = cls(config)
    tensors = load_file(str(path / "model.safetensors"))
    if cls is BTLMReference and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    model.load_state_dict(tensors, strict=True)
    return model.eval()
