"""Saved streams: a stream stopped, exported (and saved to a file) and restored goes on bit for
bit as if it had never stopped, at every level (engine rows, `jaxsink.generate`, the CLI's
--save / --resume), past the folding quantum and past 2^40 tokens; a file of another model or
layout, or a corrupt one, is one clear error naming it; a save never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxsink import cli
from jaxsink.checkpoint import save_checkpoint
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.engine import Engine, RowSampling, RowState
from jaxsink.generate import Sampling, generate
from jaxsink.loading import load
from jaxsink.stream_state import (
    SavedStream,
    StreamFileError,
    check_save_path,
    load_stream,
    read_stream_info,
    save_stream,
)
from jaxsink.traced import cache as kv
from tests.support.tiny import random_flat_params, tiny_config, write_tokenizer

STREAM = StreamConfig(2, 5)  # K = 7: every run below wraps the ring several times
CHUNK, BLOCK = 4, 5
GREEDY = RowSampling()
SAMPLED = RowSampling(temperature=0.9, top_k=20, top_p=0.9, seed=7)
SETTINGS = pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
PROMPT = [5, 17, 3, 88, 41, 9, 60, 22, 14]


def _checkpoint(root, name, cfg, seed):
    files = {"tokenizer.json": (root / "tokenizer.json").read_bytes()}
    return save_checkpoint(root / name, cfg, random_flat_params(cfg, seed=seed), "float32", files)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three tiny checkpoints with a tokenizer: `a`; `b`, the same config with other weights;
    `c`, another config."""
    root = tmp_path_factory.mktemp("models")
    write_tokenizer(root)
    cfg = tiny_config()
    return {
        "a": _checkpoint(root, "tiny-a", cfg, seed=21),
        "b": _checkpoint(root, "tiny-b", cfg, seed=22),
        "c": _checkpoint(root, "tiny-c", tiny_config(num_layers=3), seed=21),
    }


@pytest.fixture(scope="module")
def tiny(ckpts):
    """Checkpoint `a` loaded (the engine tests share its executables with the CLI's)."""
    return load(ckpts["a"], progress=False)


# --- engine rows ----------------------------------------------------------------------------


def start(engine, prompt, sampling, max_tokens):
    """A stream opened, fed and armed (with top alternatives reported) in a free row."""
    row = engine.open(sampling)
    engine.feed(row, prompt)
    engine.arm(row, dataclasses.replace(sampling, max_tokens=max_tokens), logprobs=True)
    return row


def drain(engine, row, others=None):
    """Decode until `row` stops: (its tokens, logprobs, top alternatives); the tokens of other
    rows decoded meanwhile are added to `others` (row -> list)."""
    tokens, logprobs, top = [], [], []
    while engine.live[row]:
        new = engine.decode()
        tokens += new[row]
        logprobs += engine.last[row].logprobs
        top += engine.last[row].top
        for r, t in (others or {}).items():
            t += new[r]
    return tokens, logprobs, top


def one_go(model, sampling, n, prompt=PROMPT):
    engine = Engine(model, 1, STREAM, CHUNK, BLOCK)
    return drain(engine, start(engine, prompt, sampling, n))


def stopped_after(model, sampling, n, prompt=PROMPT):
    """(first n tokens' output, the row's exported state)."""
    engine = Engine(model, 1, STREAM, CHUNK, BLOCK)
    row = start(engine, prompt, sampling, n)
    head = drain(engine, row)
    return head, engine.export(row)


def go_on(engine, state, sampling, m):
    row = engine.restore(state, sampling)
    engine.arm(row, dataclasses.replace(sampling, max_tokens=m), logprobs=True)
    return row


def joined(a, b):
    return tuple(x + y for x, y in zip(a, b, strict=True))


@SETTINGS
def test_a_restored_row_goes_on_bit_for_bit(tiny, sampling):
    """N tokens, export, restore into a new engine, M tokens: the same tokens, logprobs and top
    alternatives as N + M in one go."""
    N, M = 13, 17
    whole = one_go(tiny, sampling, N + M)
    head, state = stopped_after(tiny, sampling, N)
    assert state.index == len(PROMPT) + N
    assert len(whole[0]) == N + M and head == tuple(x[:N] for x in whole)
    engine = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    row = go_on(engine, state, sampling, M)
    assert engine.positions()[row] == len(PROMPT) + N
    assert joined(head, drain(engine, row)) == whole


def batch_of_three(model, middle, n_middle, others):
    """A batch-3 engine running others[0], `middle` (n_middle tokens) and others[2]."""
    engine = Engine(model, 3, STREAM, CHUNK, BLOCK)
    starts = [(others[0], SAMPLED, 25), (PROMPT, middle, n_middle), (others[2], SAMPLED, 25)]
    return engine, [start(engine, *s) for s in starts]


@SETTINGS
def test_a_row_restored_among_busy_rows(tiny, sampling):
    """A stream restored into the middle row of a batch-3 engine whose other rows keep decoding
    goes on as in a batch-3 engine that never stopped it, and the other rows are not disturbed:
    the same tokens and alternatives, log-probabilities within float rounding (each step runs
    the bucket of rows that are live, and XLA:CPU's products round differently at another
    batch size, restored or not; `test_a_restored_row_goes_on_bit_for_bit` runs one bucket)."""
    N, M = 13, 17
    rng = np.random.default_rng(3)
    others = [rng.integers(0, 97, size=n).tolist() for n in (6, 11, 4)]
    ref, rows = batch_of_three(tiny, sampling, N + M, others)
    want = {r: [] for r in (0, 2)}
    whole = drain(ref, rows[1], want)
    src, rows = batch_of_three(tiny, sampling, N, others)
    drain(src, rows[1])
    state = src.export(rows[1])

    busy = Engine(tiny, 3, STREAM, CHUNK, BLOCK)
    rows = [start(busy, p, SAMPLED, 25) for p in others]
    got = {r: t for r, t in zip(rows, busy.decode(), strict=True)}
    busy.release(1)
    del got[1]
    row = go_on(busy, state, sampling, M)
    assert row == 1 and busy.positions()[1] == len(PROMPT) + N
    assert_same_output(drain(busy, row, got), tuple(x[N:] for x in whole))
    while busy.live.any():
        for r, t in zip(rows, busy.decode(), strict=True):
            if r in got:
                got[r] += t
    assert got == want
    assert_same_output(one_go(tiny, sampling, N + M), whole)


def assert_same_output(got, want):
    """The same tokens and top alternatives' ids, log-probabilities within 1e-5."""
    (tokens, logprobs, top), (want_tokens, want_logprobs, want_top) = got, want
    assert tokens == want_tokens
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert [[i for i, _ in t] for t in top] == [[i for i, _ in t] for t in want_top]
    values = [[v for _, v in t] for t in top]
    np.testing.assert_allclose(values, [[v for _, v in t] for t in want_top], rtol=0, atol=1e-5)


def test_append_after_restore_equals_append_in_place(tiny):
    """A stopped row's next turn (`append`) gives the same tokens whether the row stayed in its
    engine or went out and came back."""
    turn = [30, 31, 32, 33, 34, 35]
    sampling = dataclasses.replace(SAMPLED, max_tokens=9)
    engine = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    row = start(engine, PROMPT, SAMPLED, 8)
    drain(engine, row)
    state = engine.export(row)
    engine.append(row, turn, sampling)
    in_place = drain(engine, row)
    other = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    row = other.restore(state, sampling)
    other.append(row, turn, sampling)
    assert other.positions()[row] == len(PROMPT) + 8 + len(turn)
    assert drain(other, row)[:2] == in_place[:2]


def test_a_waiting_row_keeps_its_key_and_logits(tiny):
    """A row fed a chunk at a time between the other rows' decode blocks (and one stopped while
    they go on) draws exactly the tokens it draws alone: idle steps use none of its key."""
    engine = Engine(tiny, 3, STREAM, CHUNK, BLOCK)
    busy = [start(engine, [1 + r] * 5, SAMPLED, 40) for r in range(2)]  # rows 0 and 1
    assert busy == [0, 1]
    row = engine.open(SAMPLED)
    for _ in engine.feeding(row, PROMPT * 2):
        engine.decode()
    engine.arm(row, dataclasses.replace(SAMPLED, max_tokens=12))
    got = drain(engine, row)[0]
    assert got == one_go(tiny, SAMPLED, 12, prompt=PROMPT * 2)[0]
    engine.decode()  # row 2 waits while the others decode
    engine.arm(row, dataclasses.replace(SAMPLED, max_tokens=6))
    assert got + drain(engine, row)[0] == one_go(tiny, SAMPLED, 18, prompt=PROMPT * 2)[0]


def test_restore_refuses_another_layout_or_index(tiny):
    """A state of another cache dtype or at an index out of the cache's reach is refused
    before a row is claimed."""
    _, state = stopped_after(tiny, GREEDY, 3)
    engine = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    layers = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), state.cache.layers)
    with pytest.raises(ConfigError, match="cache layout"):
        engine.restore(dataclasses.replace(state, cache=state.cache.replace(layers=layers)))
    for index in (-1, 2**80):
        with pytest.raises(ConfigError, match="out of this cache's reach"):
            engine.restore(dataclasses.replace(state, index=index))
    assert engine.free_rows() == [0]


def _arrays(saved):
    row = saved.row
    return [*jax.tree.leaves(row.cache.layers), row.logits, row.key]


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_round_trip_is_bit_exact(tiny, tmp_path, dtype):
    """save_stream + load_stream give back every array bit for bit and the JSON parts equal
    (a bfloat16 cache stays bfloat16); the loaded row goes on like the exported one."""
    _, state = stopped_after(tiny, SAMPLED, 13)
    if dtype == "bfloat16":  # a bfloat16 cache, as an engine with cache_dtype="bfloat16" keeps
        layers = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), state.cache.layers)
        state = dataclasses.replace(state, cache=state.cache.replace(layers=layers))
    saved = SavedStream(
        row=state,
        settings={"temperature": 0.9, "stop": ["t5"]},
        decoder={"ids": [4, 5], "read": 1},
        pending=[3],
        extra={"messages": [{"role": "user", "content": "é t1"}]},
    )
    path = save_stream(tmp_path / "s.stream", saved, tiny)
    loaded = load_stream(path, tiny)
    assert loaded.cache_dtype == dtype and loaded.stream == STREAM
    assert all(_same_bits(a, b) for a, b in zip(_arrays(saved), _arrays(loaded), strict=True))
    assert loaded.row.index == state.index
    assert (loaded.settings, loaded.decoder, loaded.pending, loaded.extra) == (
        saved.settings,
        saved.decoder,
        saved.pending,
        saved.extra,
    )
    info = read_stream_info(path)
    assert (info.index, info.cache_dtype, info.stream) == (state.index, dtype, STREAM)
    if dtype == "float32":
        outs = []
        for s in (saved, loaded):
            engine = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
            outs.append(drain(engine, go_on(engine, s.row, SAMPLED, 6)))
        assert outs[0] == outs[1]


# --- far streams ----------------------------------------------------------------------------


def _near(index, start):
    """The first index >= `start` where the ring holds its slots as at `index`."""
    return start + (index - start) % STREAM.window


@pytest.mark.parametrize("where", ["fold", "2^40"])
def test_far_streams_survive_save_and_load(tiny, tmp_path, where):
    """A row moved past 2^40 tokens (or to a few tokens before it folds a quantum), saved,
    loaded and restored, is at exactly its index and decodes the same tokens as the row at a
    small index; a row exported after folding (epoch >= 1) saves and restores exactly too."""
    M = 12
    _, state = stopped_after(tiny, SAMPLED, 13)
    engine = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    quantum, reach = kv.fold_quantum(engine.cache), 2 * STREAM.capacity
    far = _near(state.index, quantum + reach - 8 if where == "fold" else 2**40)
    epoch = (far + M - reach) // quantum  # the restored row's after M tokens
    assert epoch == 1 if where == "fold" else far > 2**40
    path = tmp_path / "far.stream"
    save_stream(path, SavedStream(dataclasses.replace(state, index=far), {}, {}), tiny)
    assert read_stream_info(path).index == far
    row = go_on(engine, load_stream(path, tiny).row, SAMPLED, M)
    assert engine.positions()[row] == far
    assert int(engine.cache.epoch[row]) == (0 if where == "fold" else epoch)
    small = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    expected = drain(small, go_on(small, state, SAMPLED, M))
    assert drain(engine, row) == expected
    assert engine.positions()[row] == far + M
    assert int(engine.cache.epoch[row]) == epoch  # the "fold" row folded on the way

    again = engine.export(row)
    assert again.index == far + M
    save_stream(path, SavedStream(again, {}, {}), tiny)
    back = Engine(tiny, 1, STREAM, CHUNK, BLOCK)
    row = go_on(back, load_stream(path, tiny).row, SAMPLED, 5)
    assert back.positions()[row] == far + M
    small.arm(0, dataclasses.replace(SAMPLED, max_tokens=5), logprobs=True)
    assert drain(back, row) == drain(small, 0)
    assert back.positions()[row] == far + M + 5


# --- jaxsink.generate -----------------------------------------------------------------------

LAYOUT = {"sinks": STREAM.sinks, "window": STREAM.window, "chunk": CHUNK, "block": BLOCK}
RUNS = pytest.mark.parametrize(
    "sampling, seed", [(Sampling(), 0), (Sampling(0.9, 20, 0.9), 7)], ids=["greedy", "sampled"]
)


def run(model, prompt, n, sampling, seed, **kw):
    gen = generate(model, prompt, max_new_tokens=n, sampling=sampling, seed=seed, **LAYOUT, **kw)
    pieces = list(gen)
    assert "".join(pieces) == gen.text
    return gen


@RUNS
def test_generate_saved_and_resumed_equals_one_run(tiny, tmp_path, sampling, seed):
    """`.saved()` after N tokens, through a file, then `resume=` for M more: the token ids and
    the text of N + M in one run; text appended on resume goes on the same stream."""
    whole = run(tiny, "t1 t2 t3", 30, sampling, seed)
    first = run(tiny, "t1 t2 t3", 12, sampling, seed)
    with pytest.raises(ConfigError, match="iterate"):
        generate(tiny, "t1").saved()
    path = save_stream(tmp_path / "g.stream", first.saved({"note": "kept"}), tiny)
    saved = load_stream(path, tiny)
    assert saved.extra == {"note": "kept"} and saved.pending == []
    assert saved.settings == first.settings()
    rest = run(tiny, None, 18, sampling, seed, resume=saved)
    assert first.token_ids + rest.token_ids == whole.token_ids
    assert first.text + rest.text == whole.text
    assert rest.stats.stream_position == whole.stats.stream_position == 3 + 30
    more = run(tiny, "t5 t6", 4, sampling, seed, resume=load_stream(path, tiny))
    assert more.stats.prompt_tokens == 2 and more.stats.stream_position == 3 + 12 + 2 + 4


def test_a_stream_stopped_at_eos_goes_on_after_it(tiny, tmp_path):
    """A stream that stopped at an EOS keeps it pending; resumed, the EOS is fed first and the
    stream goes on as one where that token is no EOS. (The EOS enters by a prefill rather than
    a decode step: equal tokens here, not promised bit for bit in general.)"""
    sampling, seed = Sampling(0.9, 20, 0.9), 7
    whole = run(tiny, "t1 t2 t3", 30, sampling, seed).token_ids
    k = next(i for i in range(3, len(whole)) if whole[i] not in whole[:i])
    eos = whole[k]
    stops = dataclasses.replace(tiny, cfg=dataclasses.replace(tiny.cfg, eos_token_ids=(eos,)))
    first = run(stops, "t1 t2 t3", 30, sampling, seed)
    assert first.token_ids == whole[: k + 1] and first.stats.stop_reason == "eos"
    path = save_stream(tmp_path / "eos.stream", first.saved(), stops)
    saved = load_stream(path, stops)
    assert saved.pending == [eos] and saved.row.index == 3 + k  # the EOS is not in the cache
    rest = run(stops, None, 30 - k - 1, sampling, seed, resume=saved)
    expected = whole[k + 1 :]
    if eos in expected:  # the resumed stream stops at its next EOS
        expected = expected[: expected.index(eos) + 1]
    assert rest.stats.prompt_tokens == 1 and rest.token_ids == expected
    text = tiny.tokenizer.decode(whole[: k + 1 + len(expected)], skip_special_tokens=True)
    assert first.text + rest.text == text


def test_a_dense_stream_is_resumed_only_within_its_capacity(tiny):
    """A dense cache cannot grow: a resume that would write past it is refused."""
    stream = StreamConfig(0, 256, "dense")
    cache = jax.tree.map(np.asarray, kv.init_cache(tiny.cfg, stream, 1))
    logits, key = np.zeros(97, np.float32), np.zeros(2, np.uint32)
    saved = SavedStream(RowState(cache, 3 + 4, logits, key), {}, {}, pending=[5])
    with pytest.raises(ConfigError, match="room for 247 more tokens of its 256"):
        generate(tiny, "t1", max_new_tokens=248, resume=saved)
    generate(tiny, "t1", max_new_tokens=247, resume=saved)  # fits: accepted


# --- the CLI --------------------------------------------------------------------------------

CLI_LAYOUT = ["--sinks", "2", "--window", "5", "--chunk", "4", "--block", "5"]


def cli_run(capsys, model, *argv):
    code = cli.main(["generate", "--model", str(model), "--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def token_ids(out):
    return json.loads(out.strip().splitlines()[-1])["token_ids"]


def one_error(code, err, *words):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "settings",
    [[], ["--temperature", "0.8", "--top-k", "30", "--top-p", "0.95", "--seed", "5"]],
    ids=["greedy", "sampled"],
)
def test_cli_save_and_resume_equals_one_run(capsys, tmp_path, ckpts, settings):
    """--save after 6 tokens, --resume --save onto the same file for 4, --resume for 4: the
    token ids of 14 in one run. Flags not given at resume (sampling, layout) are the saved."""
    a = ckpts["a"]
    code, out, err = cli_run(capsys, a, "--prompt", "t1 t2 t3", "--max-new-tokens", "14",
                             "--json", *CLI_LAYOUT, *settings)  # fmt: skip
    assert code == 0, err
    whole = token_ids(out)
    path = tmp_path / "s.stream"
    code, out, err = cli_run(capsys, a, "--prompt", "t1 t2 t3", "--max-new-tokens", "6",
                             "--json", "--save", str(path), *CLI_LAYOUT, *settings)  # fmt: skip
    assert code == 0, err
    got = token_ids(out)
    assert read_stream_info(path).index == 3 + 6
    code, out, err = cli_run(capsys, a, "--resume", str(path), "--max-new-tokens", "4",
                             "--json", "--save", str(path))  # fmt: skip
    assert code == 0, err
    got += token_ids(out)
    assert read_stream_info(path).index == 3 + 10  # the saved stream was replaced
    code, out, err = cli_run(capsys, a, "--resume", str(path), "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert got + token_ids(out) == whole
    assert json.loads(out.strip().splitlines()[-1])["stream_position"] == 3 + 14
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["s.stream"]
    code, out, err = cli_run(capsys, a, "--resume", str(path), "--prompt", "t5 t6",
                             "--max-new-tokens", "3", "--json")  # fmt: skip
    report = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and report["prompt_tokens"] == 2, err
    assert report["stream_position"] == 3 + 10 + 2 + 3


@pytest.fixture(scope="module")
def stream_file(tiny, tmp_path_factory):
    """A small stream of checkpoint `a` saved by `jaxsink.generate` (float32, sink 2 + 5)."""
    gen = run(tiny, "t1 t2 t3", 3, Sampling(), 0)
    return save_stream(tmp_path_factory.mktemp("saved") / "good.stream", gen.saved(), tiny)


@pytest.mark.parametrize(
    "model, argv, words",
    [
        ("b", [], ["was saved from tiny-a, not this model (tiny-b)", "FILE"]),
        ("c", [], ["was saved from tiny-a, not this model (tiny-c)", "FILE"]),
        ("a", ["--dtype", "bfloat16"], ["saved with --dtype float32", "FILE"]),
        ("a", ["--window", "6"], ["--window 6 differs", "(5)"]),
        ("a", ["--sinks", "4"], ["--sinks 4 differs"]),
        ("a", ["--mode", "window"], ["--mode window differs"]),
        ("a", ["--cache-dtype", "bfloat16"], ["--cache-dtype bfloat16 differs"]),
        ("a", ["--seed", "-1"], ["seed must be in [0, 2^32)"]),
    ],
    ids=["weights", "config", "dtype", "window", "sinks", "mode", "cache-dtype", "seed"],
)
def test_cli_resume_refuses_another_model_or_layout(capsys, ckpts, stream_file, model, argv, words):
    code, _, err = cli_run(capsys, ckpts[model], "--resume", str(stream_file), *argv)
    one_error(code, err, *(str(stream_file) if w == "FILE" else w for w in words))


def _rewrite(src, dst, state=None, metadata=None, tensors=None):
    """A copy of stream file `src` at `dst`, its JSON state, metadata or tensors edited by the
    given functions (each returns the new value)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), "np") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if state:
        meta["state"] = state(json.loads(meta["state"]))
        meta["state"] = (
            meta["state"] if isinstance(meta["state"], str) else json.dumps(meta["state"])
        )
    meta = metadata(meta) if metadata else meta
    save_file(tensors(arrays) if tensors else arrays, str(dst), metadata=meta)


def _set(part, name, value):
    def edit(state):
        (state[part] if part else state)[name] = value
        return state

    return edit


def _drop(name):
    return lambda arrays: {k: v for k, v in arrays.items() if k != name}


def _put(name, value):
    return lambda arrays: arrays | {name: value}


CORRUPT_STATES = {
    "not json": lambda s: "{nonsense",
    "a list": lambda s: "[1, 2]",
    "no stream": lambda s: {k: v for k, v in s.items() if k != "stream"},
    "sinks text": _set("stream", "sinks", "two"),
    "bad mode": _set("stream", "mode", "dense"),
    "index text": _set(None, "stream_index", "many"),
    "index float": _set(None, "stream_index", 12.5),
    "index negative": _set(None, "stream_index", -7),
    "index huge": _set(None, "stream_index", 2**80),
    "cache dtype": _set(None, "cache_dtype", "float64"),
    "cache dtype lie": _set(None, "cache_dtype", "bfloat16"),
    "model list": _set(None, "model", [1]),
    "model other": _set("model", "config_sha256", "0" * 64),
    "settings list": _set(None, "settings", [1]),
    "temperature text": _set("settings", "temperature", "hot"),
    "max tokens text": _set("settings", "max_new_tokens", "many"),
    "seed negative": _set("settings", "seed", -3),
    "stop text": _set("settings", "stop", "t5"),
    "chat text": _set("settings", "chat", "yes"),
    "decoder ids": _set("decoder", "ids", ["x"]),
    "decoder read": _set("decoder", "read", 99),
    "pending text": _set(None, "pending", "abc"),
    "pending out of range": _set(None, "pending", [500]),
}
CORRUPT_TENSORS = {
    "no cache tensor": _drop("cache.00001"),
    "no key": _drop("key"),
    "key shape": _put("key", np.zeros(3, np.uint32)),
    "key dtype": _put("key", np.zeros(2, np.float32)),
    "logits shape": _put("logits", np.zeros(5, np.float32)),
    "logits dtype": _put("logits", np.zeros(97, np.int32)),
    "extra tensor": _put("extra", np.zeros(1, np.float32)),
}


@pytest.mark.parametrize("case", [*CORRUPT_STATES, *CORRUPT_TENSORS, "format version",
                                  "no format", "truncated", "random bytes", "empty",
                                  "not a stream", "missing"])  # fmt: skip
def test_cli_resume_of_a_corrupt_file_is_one_error(capsys, tmp_path, ckpts, stream_file, case):
    bad = tmp_path / "bad.stream"
    good = stream_file.read_bytes()
    if case in CORRUPT_STATES:
        _rewrite(stream_file, bad, state=CORRUPT_STATES[case])
    elif case in CORRUPT_TENSORS:
        _rewrite(stream_file, bad, tensors=CORRUPT_TENSORS[case])
    elif case == "format version":
        _rewrite(stream_file, bad, metadata=lambda m: m | {"format_version": "99"})
    elif case == "no format":
        _rewrite(stream_file, bad, metadata=lambda m: {"state": m["state"]})
    elif case == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif case == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "not a stream":
        from safetensors.numpy import save_file

        save_file({"x": np.zeros((2, 3), np.float32)}, str(bad))
    code, _, err = cli_run(capsys, ckpts["a"], "--resume", str(bad), "--max-new-tokens", "2")
    # a saved setting of the right type out of its range is refused as the flag would be
    one_error(code, err, "seed must be" if case == "seed negative" else str(bad))


def test_cli_save_refuses_what_is_not_a_stream(capsys, tmp_path, ckpts):
    """--save onto a file that is not a saved stream, into a folder or under a file: refused
    before any work, the file untouched."""
    other = tmp_path / "notes.txt"
    other.write_bytes(b"keep me")
    args = ["--prompt", "t1", "--max-new-tokens", "2", *CLI_LAYOUT]
    code, _, err = cli_run(capsys, ckpts["a"], *args, "--save", str(other))
    one_error(code, err, str(other), "is not a saved jaxsink stream")
    assert other.read_bytes() == b"keep me"
    code, _, err = cli_run(capsys, ckpts["a"], *args, "--save", str(tmp_path))
    one_error(code, err, "is a folder")
    code, _, err = cli_run(capsys, ckpts["a"], *args, "--save", str(other / "s.stream"))
    one_error(code, err, "cannot save the stream")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    code, _, err = cli_run(capsys, ckpts["a"], *args, "--save", str(tmp_path / "new" / "s"))
    assert code == 0, err
    assert read_stream_info(tmp_path / "new" / "s").index == 1 + 2


# --- atomic saves ---------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_save_leaves_the_previous_file(tiny, tmp_path, stream_file, monkeypatch, failing):
    """A save that fails midway (the rename, or the flush before it) leaves the previous stream
    file as it was and no temporary file."""
    path = tmp_path / "s.stream"
    path.write_bytes(stream_file.read_bytes())
    before = path.read_bytes()
    saved = load_stream(path, tiny)
    saved.extra = {"changed": True}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space"):
        save_stream(path, saved, tiny)
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    save_stream(path, saved, tiny)
    assert load_stream(path, tiny).extra == {"changed": True} and leftovers(tmp_path) == []


def test_check_save_path(tmp_path, stream_file):
    assert check_save_path(stream_file) == stream_file
    assert check_save_path(tmp_path / "a" / "b.stream") == tmp_path / "a" / "b.stream"
    (tmp_path / "x").write_text("x")
    for bad in (tmp_path, tmp_path / "x", tmp_path / "x" / "y"):
        with pytest.raises(StreamFileError):
            check_save_path(bad)
    assert not (tmp_path / "a").exists()
