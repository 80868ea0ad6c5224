"""Hostile and broken inputs, interrupted and concurrent runs, quiet logs, determinism and
oversized requests (issue 15).

Every bad input must end with status 2 and one `prog: error: ...` line naming the file or flag,
with no traceback, nothing written and nothing existing changed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsink import cli
from jaxsink.checkpoint import COMPLETE_FILE, load_params, read_config
from jaxsink.convert import cli as convert_cli
from jaxsink.default_model import is_checkpoint
from jaxsink.generate import Generation, Sampling
from jaxsink.loading import load
from tests.support.gguf_files import byte_level_vocab, write_gguf
from tests.support.hf_tiny import hf_config, hf_model, tiny_hf_model

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder (config.json, model.safetensors, tokenizer.json)."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_hf_model("llama", path)
    return path


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert convert_cli.main([str(hf_dir), str(out), "--quiet"]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_one_line_error(code: int, err: str, prog: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def convert_fails(capsys, src: Path, tmp_path: Path, *words: str) -> None:
    """jaxsink-convert of `src` exits 2 with one line holding `words`, writing nothing and
    leaving `src` as it was."""
    before = snapshot(src) if src.is_dir() else src.read_bytes()
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "out"
    code = convert_cli.main([str(src), str(out)])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, "jaxsink-convert", *words)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (snapshot(src) if src.is_dir() else src.read_bytes()) == before


def jaxsink_fails(capsys, *argv: str, words=()) -> str:
    """`jaxsink ARGV` exits 2 with one line holding `words`; returns the line."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, f"jaxsink {argv[0]}", *words)
    assert out == ""
    return err


def load_fails(capsys, folder: Path, *words: str) -> None:
    """Loading the checkpoint `folder` (`jaxsink generate`) exits 2 with one line holding `words`."""
    jaxsink_fails(capsys, "generate", "--model", str(folder), "--prompt", "t1", words=words)


def copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- hostile safetensors ---------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, data: bytes, pad_to: int = 0) -> None:
    """A safetensors file with `header` over `data`, the header padded with spaces (which
    safetensors allows) to `pad_to` bytes so the file keeps its size."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * max(0, pad_to - len(text))
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _tensors(header: dict) -> list[str]:
    """Tensor names in data order."""
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def overlap(header: dict, data: bytes):
    first, second = _tensors(header)[:2]
    begin = header[first]["data_offsets"][0]
    size = np.subtract(*header[second]["data_offsets"][::-1])
    header[second]["data_offsets"] = [begin, begin + int(size)]
    return header, data, "overlaps"


def past_the_data(header: dict, data: bytes):
    last = _tensors(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + 4096]
    return header, data, "past the"


def wrong_byte_count(header: dict, data: bytes):
    name = _tensors(header)[0]
    header[name]["shape"] = [2 * d for d in header[name]["shape"]]
    return header, data, "bytes"


def header_past_the_file(header: dict, data: bytes):
    return None, data, "header length"


@pytest.mark.parametrize(
    "hostile", [overlap, past_the_data, wrong_byte_count, header_past_the_file]
)
def test_hostile_safetensors(capsys, tmp_path, hf_dir, ckpt, hostile):
    """Refused from the header alone, both as a conversion source and as a checkpoint's weights
    (the file keeps its size, so the completeness marker alone would not catch it)."""
    for folder, run in ((copy(hf_dir, tmp_path), "convert"), (copy(ckpt, tmp_path, "c"), "load")):
        weights = folder / "model.safetensors"
        size = weights.stat().st_size
        header, data = read_header(weights)
        header, data, words = hostile(header, data)
        if header is None:  # a length of 2^40 bytes in place of the header's
            weights.write_bytes((1 << 40).to_bytes(8, "little") + weights.read_bytes()[8:])
        else:
            write_header(weights, header, data, pad_to=size - 8 - len(data))
        assert weights.stat().st_size == size
        if run == "convert":
            convert_fails(capsys, folder, tmp_path / "o", str(weights), words)
        else:
            load_fails(capsys, folder, str(weights), words, "again")


def test_truncated_checkpoint_weights(capsys, tmp_path, ckpt):
    folder = copy(ckpt, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    load_fails(capsys, folder, "corrupt weights", str(weights), "convert its source again")


# --- hostile GGUF ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    hf = hf_config("llama", vocab_size=len(byte_level_vocab()[0]))
    sd = {k: v.numpy() for k, v in hf_model(hf).state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, "llama", sd, hf)
    return path


def _patch(raw: bytes, offset: int, value: int) -> bytes:
    return raw[:offset] + value.to_bytes(8, "little") + raw[offset + 8 :]


def _dims_offset(raw: bytes, name: bytes) -> int:
    """Where the first dimension of tensor `name` sits in the tensor infos (after its name and
    its u32 dimension count)."""
    return raw.index(name, raw.index(b"token_embd.weight")) + len(name) + 4


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda raw: raw[: len(raw) * 4 // 5], "truncated"),
        (lambda raw: _patch(raw, _dims_offset(raw, b"output.weight"), 1 << 40), "corrupt"),
        (lambda raw: _patch(raw, 8, 1 << 40), "claims 1099511627776 tensors"),
        (lambda raw: _patch(raw, 16, 1 << 40), "metadata keys"),
    ],
    ids=["truncated", "dims", "tensor-count", "key-count"],
)
def test_hostile_gguf(capsys, tmp_path, gguf_file, damage, words):
    src = tmp_path / "bad.gguf"
    src.write_bytes(damage(gguf_file.read_bytes()))
    convert_fails(capsys, src, tmp_path / "o", str(src), words)


# --- hostile or inconsistent config.json -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"vocab_size": 10**12}, "vocab_size must be in [1, 8388608], got 1000000000000"),
        ({"num_hidden_layers": 10**6}, "number of layers must be in [1, 4096]"),
        ({"hidden_size": 10**9, "head_dim": 8}, "hidden_size must be in"),
        ({"intermediate_size": 10**12}, "mlp size"),
        ({"num_attention_heads": 8}, "the config does not describe these weights"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_kv_heads"),
        ({"num_hidden_layers": 3}, "missing source tensors: model.layers.2"),
        ({"num_hidden_layers": 1}, "does not use: model.layers.1"),
        ({"vocab_size": 200}, "the config does not describe these weights"),
        ({"num_hidden_layers": "two"}, "wrong type"),
        ({"rms_norm_eps": [1]}, "wrong type"),
    ],
)
def test_hostile_hf_config(capsys, tmp_path, hf_dir, change, words):
    src = copy(hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | change))
    convert_fails(capsys, src, tmp_path / "o", words)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("config.json", b'{"model_type": "llama", ', "config.json is not valid JSON"),
        ("config.json", b"\xff\xfe\x00", "config.json is not valid JSON"),
        ("config.json", b"[" * 100_000, "config.json is not valid JSON"),
        ("tokenizer.json", b"not json at all", "tokenizer.json is not valid JSON"),
        ("tokenizer.json", b'{"model": 1}', "tokenizer.json is not a valid tokenizer.json"),
        ("generation_config.json", b"{", "generation_config.json is not valid JSON"),
    ],
)
def test_broken_json_files(capsys, tmp_path, hf_dir, name, content, words):
    src = copy(hf_dir, tmp_path)
    (src / name).write_bytes(content)
    convert_fails(capsys, src, tmp_path / "o", words)


def test_pickles_are_refused_never_unpickled(capsys, tmp_path, hf_dir):
    class Trap:  # unpickling it would create a file
        def __reduce__(self):
            return Path.touch, (tmp_path / "unpickled",)

    src = copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "model.pt"):
        (src / name).write_bytes(pickle.dumps(Trap()))
    convert_fails(capsys, src, tmp_path / "o", "pickled", "never loaded", "save_pretrained")
    convert_fails(capsys, src / "model.pt", tmp_path / "o", "pickled", "safetensors")
    assert not (tmp_path / "unpickled").exists()


def _edit_model(folder: Path, edit) -> None:
    meta = json.loads((folder / "config.json").read_text())
    edit(meta["model"])
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.update(vocab_size=10**12), "vocab_size must be in"),
        (lambda m: m.update(layers=m["layers"] * 3000), "number of layers must be in [1, 4096]"),
        (lambda m: m["layers"][0]["attention"].update(num_heads="4"), "num_heads: expected int"),
        (lambda m: m["layers"][0]["attention"].update(num_kv_heads=3), "multiple"),
        (lambda m: m["layers"][1]["mlp"].update(size=10**9), "mlp size"),
        (lambda m: m.update(hidden_size=64), "has shape"),
        (lambda m: m.update(hidden_size=32.0), "expected int"),
        (lambda m: m.pop("final_norm"), "final_norm"),
    ],
)
def test_hostile_checkpoint_config(capsys, tmp_path, ckpt, edit, words):
    folder = copy(ckpt, tmp_path)
    _edit_model(folder, edit)
    before = snapshot(folder)
    load_fails(capsys, folder, words)
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("config.json", b"{", "config.json is not valid JSON"),
        ("config.json", b"[]", "does not hold a JSON object"),
        ("tokenizer.json", b"{", "tokenizer.json is not a valid tokenizer.json"),
        ("tokenizer_config.json", b"{", "tokenizer_config.json is not valid JSON"),
        (COMPLETE_FILE, None, "incomplete"),
    ],
)
def test_broken_checkpoint_files(capsys, tmp_path, ckpt, name, content, words):
    folder = copy(ckpt, tmp_path)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    load_fails(capsys, folder, words)


# --- outputs never half-written or clobbered -------------------------------------------------


def test_existing_output_is_refused_and_unchanged(capsys, tmp_path, hf_dir, ckpt):
    out = copy(ckpt, tmp_path, "out")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code = convert_cli.main([str(hf_dir), str(out)])
    assert_one_line_error(
        code, capsys.readouterr().err, "jaxsink-convert", "already exists", "--overwrite"
    )
    assert snapshot(tmp_path) == before


def test_unwritable_output_fails_before_any_work(capsys, tmp_path, hf_dir):
    (tmp_path / "file").write_text("x")
    broken = copy(hf_dir, tmp_path)
    (broken / "config.json").write_text("{")  # reading the source would fail differently
    for out in (tmp_path / "file" / "model", tmp_path / "file"):
        code = convert_cli.main([str(broken), str(out), "--overwrite"])
        assert_one_line_error(code, capsys.readouterr().err, "jaxsink-convert", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "src"]


def test_ppl_out_that_is_a_file(capsys, tmp_path, ckpt):
    (tmp_path / "file").write_text("x")
    np.save(tmp_path / "ids.npy", np.arange(20))
    jaxsink_fails(
        capsys,
        "ppl",
        "--model",
        str(ckpt),
        "--tokens",
        str(tmp_path / "ids.npy"),
        "--out",
        str(tmp_path / "file" / "o"),
        words=("--out",),
    )
    assert (tmp_path / "file").read_text() == "x"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return env | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"} | extra


def test_conversion_killed_at_random_moments_never_leaves_a_loadable_half(tmp_path):
    """SIGKILL real conversions at random moments, some anywhere in the run, some while the
    checkpoint is being written (once its temporary folder appears): what is left at OUT is
    either nothing or the complete checkpoint, and nothing half-written ever loads."""
    src = tmp_path / "big"
    tiny_hf_model("llama", src, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=4000)  # fmt: skip
    cmd = [sys.executable, "-m", "jaxsink.convert.cli", str(src)]
    start = time.perf_counter()
    subprocess.run([*cmd, str(tmp_path / "ref"), "--quiet"], env=_env(), check=True)
    full = time.perf_counter() - start
    want = load_params(tmp_path / "ref", read_config(tmp_path / "ref")[0])
    rng = random.Random()
    outcomes = []
    for i in range(6):
        parent = tmp_path / f"kill{i}"
        parent.mkdir()
        out = parent / "model"
        proc = subprocess.Popen([*cmd, str(out), "--quiet"], env=_env(), stderr=subprocess.PIPE)
        if i % 2:
            time.sleep(rng.uniform(0.2, 1.1) * full)
        else:
            while proc.poll() is None and not any(parent.glob(".model.tmp-*")):
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(sorted(p.name.split("-")[0] for p in parent.iterdir()))
        if out.exists():
            assert is_checkpoint(out)
            got = load_params(out, read_config(out)[0])
            assert all(np.array_equal(got[k], want[k]) for k in want)
        for leftover in parent.iterdir():
            assert leftover == out or not is_checkpoint(leftover), (leftover, outcomes)


# --- concurrent runs -------------------------------------------------------------------------


def test_two_processes_convert_once_and_agree(tmp_path, hf_dir):
    """Two real `jaxsink generate` runs on an empty home, started while the model's lock is
    held (so both must wait): one converts, the other waits and loads its checkpoint; both
    sample the same text; nothing else is printed (no third-party warnings)."""
    from filelock import FileLock

    from jaxsink.default_model import resolve_model

    home = tmp_path / "home"
    env = _env(JAXSINK_HOME=str(home))
    argv = [
        sys.executable,
        "-m",
        "jaxsink.cli",
        "generate",
        "--model",
        str(hf_dir),
        "--prompt",
        "t1 t2 t3",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.9",
        "--seed",
        "5",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSINK_HOME", str(home))
        mp.setattr("jaxsink.default_model.build_once", lambda out, build, progress: out)
        target = resolve_model(str(hf_dir))  # where it will be converted, not converting it
    target.parent.mkdir(parents=True)
    logs = [tmp_path / f"err{i}" for i in range(2)]
    with FileLock(target.parent / f".{target.name}.lock"):
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
            for log in logs
        ]
        deadline = time.time() + 120
        while not all("waiting" in log.read_text() for log in logs) and time.time() < deadline:
            time.sleep(0.2)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert outs[0] == outs[1] and outs[0].strip()
    lines = "".join(errs).splitlines()
    assert sum(line.startswith("jaxsink: waiting") for line in lines) == 2, lines
    assert sum(line.startswith("jaxsink: converting") for line in lines) == 1, lines
    assert all(line.startswith("jaxsink: ") for line in lines), lines
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == [target.name]


# --- quiet, useful output --------------------------------------------------------------------


def test_progress_bars_only_on_a_terminal(capsys, tmp_path, hf_dir, ckpt):
    np.save(tmp_path / "ids.npy", np.arange(300) % 97)
    code = cli.main(
        [
            "ppl",
            "--model",
            str(ckpt),
            "--tokens",
            str(tmp_path / "ids.npy"),
            "--chunk",
            "8",
            "--window",
            "16",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and "\r" not in err and err.count("\n") == 1, err  # the summary line
    assert convert_cli.main([str(hf_dir), str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err == ""


def test_quiet_on_every_command(capsys, tmp_path, hf_dir, monkeypatch):
    monkeypatch.setenv("JAXSINK_HOME", str(tmp_path / "home"))
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(hf_dir),
                "--prompt",
                "t1",
                "--quiet",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    np.save(tmp_path / "ids.npy", np.arange(20))
    assert (
        cli.main(["ppl", "--model", str(hf_dir), "--tokens", str(tmp_path / "ids.npy"), "--quiet"])
        == 0
    )
    assert convert_cli.main([str(hf_dir), str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "jaxsink:" not in err and "\r" not in err, err


def test_transformers_imported_without_torch_says_nothing(tmp_path):
    code = (
        "import importlib.abc, importlib.metadata as md, importlib.util, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "find, version = importlib.util.find_spec, md.version\n"
        "importlib.util.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' "
        "else find(n, *a, **k)\n"
        "def no_torch_version(n):\n"
        "    if n == 'torch': raise md.PackageNotFoundError(n)\n"
        "    return version(n)\n"
        "md.version = no_torch_version\n"
        "from jaxsink.convert.tokenizer import _import_transformers\n"
        "assert not _import_transformers().is_torch_available()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" not in done.stderr and done.stderr == "", done.stderr


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        convert_cli.main([])
    assert e.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, "jaxsink-convert", "src, out")


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_same_text_across_chunks_and_blocks(ckpt):
    """Sampled tokens depend on the seed alone: not on the run, the prompt's chunk size or the
    decode block size."""
    model = load(ckpt)
    prompt = " ".join(f"t{i % 97}" for i in range(3, 60, 3))
    sampling = Sampling(temperature=1.0, top_p=0.95)

    def tokens(chunk: int, block: int, seed: int = 7) -> list[int]:
        gen = Generation(
            model,
            prompt,
            max_new_tokens=24,
            sampling=sampling,
            seed=seed,
            window=12,
            chunk=chunk,
            block=block,
        )
        list(gen)
        return gen.token_ids

    want = tokens(64, 16)
    assert len(want) == 24
    assert tokens(64, 16) == want
    for chunk, block in ((5, 16), (1, 16), (64, 1), (64, 5)):
        assert tokens(chunk, block) == want, (chunk, block)
    assert tokens(64, 16, seed=8) != want


# --- oversized requests for memory -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["generate", "--prompt", "t1", "--window", str(10**10)], "--window 10000000000"),
        (["generate", "--prompt", "t1", "--mode", "window", "--window", str(10**10)], "--window"),
        (
            ["generate", "--prompt", "t1", "--mode", "dense", "--max-new-tokens", str(10**10)],
            "dense cache",
        ),
        (["ppl", "--window", str(10**11), "--mode", "sink", "window"], "--window"),
    ],
)
def test_oversized_cache_is_refused(capsys, tmp_path, ckpt, argv, words):
    if argv[0] == "ppl":
        np.save(tmp_path / "ids.npy", np.arange(20))
        argv = [*argv, "--tokens", str(tmp_path / "ids.npy"), "--out", str(tmp_path / "o")]
    jaxsink_fails(capsys, *argv, "--model", str(ckpt), words=(words, "GiB", "available"))
    assert not (tmp_path / "o").exists()


def test_oversized_window_in_the_library(ckpt):
    from jaxsink.config import ConfigError
    from jaxsink.evaluate import stream_nll

    model = load(ckpt)
    with pytest.raises(ConfigError, match="window 1000000000000"):
        Generation(model, "t1", window=10**12)
    with pytest.raises(ConfigError, match="dense cache of"):
        Generation(model, "t1", mode="dense", max_new_tokens=10**12)
    with pytest.raises(ConfigError, match="more than this machine has"):
        stream_nll(model, np.arange(10), "window", window=10**12, progress=False)
