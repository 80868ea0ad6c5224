"""The tokenizers real checkpoints ship, converted: a SentencePiece `tokenizer.model` alone, a
SentencePiece GGUF vocabulary, and no tokenizer at all.

The SentencePiece model is trained here (Llama style: BPE, byte fallback, split digits, control
and user-defined symbols); the references are transformers' own tokenizers built from the same
file or GGUF metadata, and sentencepiece itself.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from sentencepiece import sentencepiece_model_pb2

from jaxsink import cli
from jaxsink.checkpoint import CheckpointError
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.tokenizer import Tokenizer
from tests.support.gguf_files import TEXT, assert_tokenizers_match, write_gguf
from tests.support.hf_tiny import hf_config, hf_model, tiny_hf_model

pytestmark = pytest.mark.torch

CORPUS = [
    "Attention sinks keep the first few tokens of a stream in the cache forever.",
    "The window keeps the most recent tokens, so memory stays constant as the stream grows.",
    "Hello world: the model reads 1024 tokens, then 4096, then 65536, without retraining.",
    "Keys are cached before the rotary embedding and rotated to their place in the cache.",
    "Perplexity stays flat in sink mode and explodes in window mode once the sinks are evicted.",
    "A checkpoint is a folder with config.json, model.safetensors and tokenizer files.",
    "<|im_start|>user\nWhat is an attention sink?<|im_end|>\n<|im_start|>assistant\n<think>",
    "the the the there then these those they them their theirs thereafter",
]
# Text with no special tokens, as sentencepiece itself treats it (control symbols are plain text
# to sentencepiece, but special to transformers).
PLAIN = "Hello world, the sink keeps 1234 tokens;  two  spaces\tand tabs\n\nnew lines éà 日本語 🤖"


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """A serialized Llama-style SentencePiece BPE model (ids: 0 <unk>, 1 <s>, 2 </s>)."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=writer,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        control_symbols=["<|im_start|>", "<|im_end|>"],
        user_defined_symbols=["<think>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return writer.getvalue()


def pieces(sp_model: bytes) -> list:
    """The pieces (`.piece`, `.score`, `.type`) of a serialized SentencePiece model."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model)
    return list(proto.pieces)


def assert_matches_sentencepiece(ours: Tokenizer, sp_model: bytes) -> None:
    """On text without special tokens our tokenizer is sentencepiece, both ways."""
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = sp.encode(PLAIN)
    assert ours.encode(PLAIN, add_special_tokens=False) == ids
    assert ours.decode(ids) == sp.decode(ids) == PLAIN


# --- a Hugging Face folder with only tokenizer.model -----------------------------------------


@pytest.mark.parametrize(
    "tokenizer_config",
    [
        None,
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False},
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_eos_token": True},
        {"tokenizer_class": "LlamaTokenizer", "legacy": False},
    ],
)
def test_sentencepiece_folder_converts_like_llama_tokenizer_fast(
    tmp_path, sp_model, tokenizer_config
):
    src = tmp_path / "hf"
    tiny_hf_model("llama", src, vocab_size=len(pieces(sp_model)))
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(sp_model)
    if tokenizer_config is not None:
        (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    out = convert(src, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").is_file()
    config = tokenizer_config or {}
    # BOS unless the config says otherwise: LlamaTokenizer's documented default, which
    # transformers 5 applies only when it is stated.
    ref = transformers.LlamaTokenizerFast.from_pretrained(
        src, add_bos_token=config.get("add_bos_token", True)
    )
    ours = Tokenizer(out)
    want = ref(TEXT)["input_ids"]
    assert ours.encode(TEXT) == want
    assert (want[0] == 1) == config.get("add_bos_token", True)
    assert (want[-1] == 2) == config.get("add_eos_token", False)
    plain = ref(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.encode(TEXT, add_special_tokens=False) == plain
    assert ours.decode(plain) == ref.decode(plain)
    assert_matches_sentencepiece(ours, sp_model)


def test_legacy_flag_is_respected(tmp_path, sp_model):
    """legacy=True puts a "▁" after every special token, legacy=False only at the start."""
    encoded = {}
    for legacy in (True, False):
        src = tmp_path / f"hf-{legacy}"
        tiny_hf_model("llama", src, vocab_size=len(pieces(sp_model)))
        (src / "tokenizer.json").unlink()
        (src / "tokenizer.model").write_bytes(sp_model)
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy}
        (src / "tokenizer_config.json").write_text(json.dumps(config))
        out = convert(src, tmp_path / f"out-{legacy}", progress=False)
        encoded[legacy] = Tokenizer(out).encode("<|im_start|>the", add_special_tokens=False)
    assert encoded[True] != encoded[False]


# --- a SentencePiece GGUF vocabulary -----------------------------------------------------------


def write_sentencepiece_vocab(w, sp_model: bytes) -> None:
    """The tokenizer metadata llama.cpp writes for a SentencePiece model: every piece with its
    score and type (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)."""
    model = pieces(sp_model)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in model])
    w.add_token_scores([p.score for p in model])
    w.add_token_types([p.type for p in model])
    w.add_unk_token_id(0)


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, sp_model, add_bos):
    hf = hf_config("llama", vocab_size=len(pieces(sp_model)))
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    vocab = lambda w: write_sentencepiece_vocab(w, sp_model)  # noqa: E731
    write_gguf(tmp_path / "tiny.gguf", "llama", sd, hf, add_bos=add_bos, vocab=vocab)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert_tokenizers_match(out, ref)
    ours = Tokenizer(out)
    for text in (TEXT, " leading space", "a<think>b", "<|im_start|>hi<|im_end|>\n", ""):
        want = ref(text)["input_ids"]
        assert ours.encode(text) == want, text
        assert ours.decode(want) == ref.decode(want), text
    assert (ours.encode("x")[0] == 1) == add_bos
    assert_matches_sentencepiece(ours, sp_model)


# --- no tokenizer at all -----------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_folder_without_tokenizer_serves_token_ids_only(tmp_path, capsys):
    src = tmp_path / "hf"
    tiny_hf_model("llama", src)
    (src / "tokenizer.json").unlink()
    out = tmp_path / "out"
    assert convert_main([str(src), str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"jaxsink-convert: warning: {src.resolve()} has no tokenizer; token-id commands work, "
        f"text commands need one: copy tokenizer.json into {out}"
    ]
    assert not (out / "tokenizer.json").exists()

    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 97, 40))
    ppl = ["ppl", "--model", str(out), "--tokens", str(tmp_path / "ids.npy"), "--quiet"]
    assert cli.main([*ppl, "--chunk", "16"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    (tmp_path / "text.txt").write_text("some text to score")
    for argv in (
        ["generate", "--model", str(out), "--prompt", "hi"],
        ["generate", "--model", str(out), "--prompt", "hi", "--chat"],
        ["ppl", "--model", str(out), "--text", str(tmp_path / "text.txt")],
    ):
        assert cli.main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert f"{out} has no tokenizer" in line and "copy tokenizer.json" in line, line


def test_runtime_tokenizer_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    tok = Tokenizer(tmp_path, eos_token_ids=(2,))
    assert (tok.eos_token_ids, tok.bos_token_id, tok.vocab_size) == ((2,), None, None)
    for use in (
        lambda: tok.encode("hi"),
        lambda: tok.decode([1, 2]),
        lambda: tok.apply_chat_template([{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(CheckpointError, match="has no tokenizer"):
            use()
