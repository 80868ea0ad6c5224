"""Tokenizer files for a checkpoint: copied from a Hugging Face folder or rebuilt from GGUF.

A Hugging Face folder without `tokenizer.json` gets one from transformers: from a SentencePiece
`tokenizer.model` (Llama 2, Mistral, Yi) as `LlamaTokenizerFast` converts it, which needs the
`sentencepiece` and `protobuf` packages; from slow vocabulary files (`vocab.json` + `merges.txt`)
by `AutoTokenizer`. A folder with no tokenizer at all gives a checkpoint without one.

A GGUF file has no `tokenizer.json`, only llama.cpp metadata (`tokenizer.ggml.*`). For byte-level
BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece BPE (`"llama"`) vocabularies we rebuild
the same tokenizer transformers builds from that metadata
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), with the public `tokenizers` API: loading a
GGUF through transformers itself may need torch, which conversion does without.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConvertError
from .hf import read_json

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
HF_EXTRA_FILES = ("generation_config.json",)
SENTENCEPIECE_MODEL = "tokenizer.model"
SLOW_VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt")  # what AutoTokenizer builds from

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# tokenizer_config name -> GGUF metadata key of its id
SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex its merges were learned with. Any other value gets
# GPT-2's byte-level regex, as in transformers.
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def hf_tokenizer_files(src: Path) -> dict[str, bytes]:
    """Tokenizer (and generation config) files of a Hugging Face folder, by name.

    Without `tokenizer.json`, transformers builds one: `LlamaTokenizerFast` from a SentencePiece
    `tokenizer.model` (honouring `tokenizer_config.json`: `add_bos_token`, `legacy`, special
    tokens; BOS is added unless it says not to, LlamaTokenizer's documented default, which
    transformers 5 applies only when the file states it), `AutoTokenizer` from slow vocabulary
    files. A folder with neither gives no `tokenizer.json` (a checkpoint for token ids only).
    """
    names = HF_TOKENIZER_FILES + HF_EXTRA_FILES
    files = {name: (src / name).read_bytes() for name in names if (src / name).is_file()}
    for name in files:
        if name.endswith(".json"):
            read_json(src / name)
    if "tokenizer.json" in files:
        check_tokenizer_json(src / "tokenizer.json")
        return files
    if (src / SENTENCEPIECE_MODEL).is_file():
        config = (
            read_json(src / "tokenizer_config.json") if "tokenizer_config.json" in files else {}
        )
        defaults = {} if "add_bos_token" in config else {"add_bos_token": True}
        return files | _build_fast_tokenizer(src, "LlamaTokenizerFast", **defaults)
    if any((src / name).is_file() for name in SLOW_VOCAB_FILES):
        return files | _build_fast_tokenizer(src, "AutoTokenizer")
    return files


def check_tokenizer_json(path: Path) -> None:
    """Refuse a `tokenizer.json` the `tokenizers` library cannot load, naming it."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type for any bad file
        raise ConvertError(
            f"{path} is not a valid tokenizer.json ({' '.join(str(e).split())[:200]}); "
            "download it again"
        ) from None


def _import_transformers():
    """transformers, imported without the "PyTorch was not found" notice it logs when torch is
    absent (irrelevant to its tokenizers): its switch for such advisory notices is on only
    for the import."""
    key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        import transformers
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before
    return transformers


def _build_fast_tokenizer(src: Path, loader: str, **overrides: Any) -> dict[str, bytes]:
    """The tokenizer files transformers writes for `src` (which has no tokenizer.json), loading it
    with `transformers.<loader>.from_pretrained(src, **overrides)`."""
    try:
        transformers = _import_transformers()
        tokenizer = getattr(transformers, loader).from_pretrained(str(src), **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            built = {
                n: (Path(tmp) / n).read_bytes()
                for n in HF_TOKENIZER_FILES
                if (Path(tmp) / n).is_file()
            }
    except Exception as e:  # transformers raises many types; all mean "no tokenizer"
        raise ConvertError(
            f"{src} has no tokenizer.json and transformers' {loader} could not build one: {e}"
        ) from None
    if "tokenizer.json" not in built:
        raise ConvertError(f"{src} has no tokenizer.json and transformers did not write one")
    return built


def gguf_tokenizer_files(meta: Mapping[str, Any]) -> dict[str, bytes]:
    """`tokenizer.json` and `tokenizer_config.json` rebuilt from GGUF metadata (`key -> value`).

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece BPE (`"llama"`) are
    supported.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZER_BUILDERS:
        raise ConvertError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2' and "
            "SentencePiece 'llama'); convert the original Hugging Face model instead"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError("GGUF tokenizer metadata lacks tokenizer.ggml.tokens")
    ids = {name: meta[key] for name, key in SPECIAL_IDS.items() if meta.get(key) is not None}
    if bad := {name: i for name, i in ids.items() if not 0 <= i < len(tokens)}:
        raise ConvertError(f"GGUF special token ids out of range: {bad}")
    specials = {name: tokens[i] for name, i in ids.items()}
    # llama.cpp and transformers add BOS to a SentencePiece vocabulary the file says nothing of
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_bos = add_bos and "bos_token" in specials
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in specials
    tokenizer = GGUF_TOKENIZER_BUILDERS[kind](meta)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)  # 1: normal
    if len(types) != len(tokens):
        raise ConvertError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    _add_special_tokens(tokenizer, tokens, types, specials)
    tokenizer.post_processor = _template(tokenizer, specials, add_bos, add_eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False).encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def _byte_level_bpe(meta: Mapping[str, Any]):
    """A byte-level BPE tokenizer over the GGUF tokens (respelled into the byte alphabet if
    needed) and merges, splitting text as `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ConvertError("GGUF tokenizer metadata lacks tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre") or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: Mapping[str, Any]):
    """A SentencePiece BPE vocabulary as transformers' LlamaTokenizer (non-legacy) runs it: merges
    recovered from the token scores, bytes for unknown characters (`<0x41>` tokens), spaces as
    "▁" and one "▁" before the text unless `tokenizer.ggml.add_space_prefix` is false."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ConvertError("GGUF SentencePiece vocabulary lacks a score per token")
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges_from_scores(vocab, dict(zip(tokens, scores, strict=True))),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple]:
    """The BPE merges a SentencePiece vocabulary implies (it stores none), best first.

    Each token that splits into two tokens of the vocabulary gives one merge per such split; a
    higher score merges first, then a longer left, then a longer right part, then vocabulary
    order: transformers' `generate_merges` with scores.
    """
    merges = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted(
            ((left, right) for left, right in splits if left in vocab and right in vocab),
            key=lambda pair: (vocab[pair[0]], vocab[pair[1]]),
        )
        merges += [(score, left, right) for left, right in pairs]
    merges.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    return [(left, right) for _, left, right in merges]


# `tokenizer.ggml.model` -> the builder of its tokenizer (model, pre-tokenizer, decoder)
GGUF_TOKENIZER_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int], specials: dict) -> None:
    """Control tokens and the bos/eos/unk/pad tokens become special (matched whole, skipped when
    decoding with skip_special_tokens); user-defined ones become plain added tokens."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    special = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL] + list(
        specials.values()
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t in dict.fromkeys(special)
            if t in vocab
        ]
    )
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _template(tokenizer, specials: dict, add_bos: bool, add_eos: bool):
    """The post-processor that adds BOS / EOS as the GGUF asks (as transformers writes it)."""
    from tokenizers import processors

    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (
        f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    )
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(used)],
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet):
    printable bytes map to themselves, the others to chr(256), chr(257), ... in byte order."""
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    moved = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + n) for n, b in enumerate(moved)}
