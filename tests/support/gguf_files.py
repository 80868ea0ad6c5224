"""Tiny GGUF files as llama.cpp's converter writes them (from a transformers state dict, some
tensors quantized by `gguf`), and the check that a tokenizer converted from one encodes like
transformers' own. Importing it needs neither torch nor transformers (`tiny_gguf` builds its
model with both)."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

# What `assert_tokenizers_match` encodes: the control and user-defined tokens and the "\n\n" of
# `byte_level_vocab`, digits, runs of spaces, a tab, CRLF, contractions, accents, CJK, an emoji.
TEXT = (
    "Hello the world in\n\nthe 123 4567 numbers; éà 日本語 🤖 <|im_start|>user\nhi<|im_end|>"
    "  <think> spaces   \t tab the\r\n don't I'LL x²  <|endoftext|>the end  "
)


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (q/k rows to interleaved rotary)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiny gpt2-style vocabulary with control tokens, a
    user-defined token and a token stored unspelled ("\\n\\n", not in the byte alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ċ Ċ", "1 2", "Ġ Ġ"]
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa", "er", "\n\n", "12", "ĠĠ"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet + merged + ["<think>"]
    types = [3] * len(specials) + [1] * (len(alphabet) + len(merged)) + [4]
    return tokens, types, merges


def write_byte_level_vocab(w: gguf.GGUFWriter, model: str = "gpt2") -> None:
    """The tokenizer metadata of `byte_level_vocab`, stated as tokenizer model `model`."""
    tokens, types, merges = byte_level_vocab()
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def write_gguf(path: Path, arch: str, sd: dict, hf, add_bos: bool = True, vocab=None, types=None):
    """A float32 GGUF as llama.cpp's converter writes it (q/k rows permuted for llama).

    vocab: writes the tokenizer's vocabulary metadata into the `gguf.GGUFWriter` it is given
    (default `write_byte_level_vocab`); ids 1 and 2 are BOS and EOS (and pad).
    types: GGUF tensor name -> a GGML type name (`Q4_1`, ...) it is quantized to by `gguf`.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(hf.num_hidden_layers)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    w.add_rope_freq_base(hf.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_vocab_size(hf.vocab_size)
    w.add_rope_dimension_count(hf.hidden_size // hf.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    (vocab or write_byte_level_vocab)(w)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for name, value in sd.items():
        if name.startswith("model.layers."):
            i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                value = llamacpp_permute(value, hf.num_attention_heads, hf.num_attention_heads)
            if arch == "llama" and rest == "self_attn.k_proj.weight":
                value = llamacpp_permute(value, hf.num_attention_heads, hf.num_key_value_heads)
            name = f"blk.{i}.{GGUF_LAYER_NAMES[rest]}"
        else:
            name = GGUF_GLOBAL_NAMES[name]
        kind = (types or {}).get(name)
        if kind is None:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            raw = gguf.quants.quantize(np.ascontiguousarray(value, np.float32), qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gguf(path: Path, types: dict[str, str], tied: bool = False):
    """Write a tiny random llama GGUF (hidden 64, head dim 32, MLP 64) to `path`, its tensors
    quantized as `types` says (GGUF names -> GGML type names; the rest float32)."""
    from tests.support.hf_tiny import hf_config, hf_model

    hf = hf_config(
        "llama",
        vocab_size=len(byte_level_vocab()[0]),
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=tied,
    )
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    if tied:
        del sd["lm_head.weight"]
    write_gguf(path, "llama", sd, hf, types=types)


def assert_tokenizers_match(out: Path, ref) -> None:
    """Our tokenizer.json (raw and through AutoTokenizer) encodes like `ref`, transformers' own
    tokenizer built from the GGUF, specials and BOS included, and decodes back to the text."""
    import transformers

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ours_auto = transformers.AutoTokenizer.from_pretrained(out)
    want = ref(TEXT)["input_ids"]
    assert ours.encode(TEXT).ids == want
    assert ours_auto(TEXT)["input_ids"] == want
    plain = ours.encode(TEXT, add_special_tokens=False).ids
    assert plain == ref(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.decode(plain, skip_special_tokens=False) == TEXT
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours_auto, name) == getattr(ref, name), name
