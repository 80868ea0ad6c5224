"""Bad input to the CLIs: status 2, one line on stderr naming the problem, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsink import cli
from tests.support.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--window", "0"], "window must be >= 1"),
        (["--sinks", "-2"], "sinks must be >= 0"),
        (["--chunk", "0"], "chunk must be >= 1"),
        (["--n-tokens", "0"], "n-tokens"),
        (["--n-tokens", "500"], "needs 501"),
    ],
)
def test_ppl_bad_flags(capsys, tmp_path, tiny_dir, argv, message):
    np.save(tmp_path / "ids.npy", np.arange(100) % 90)
    code, _out, err = _run(
        capsys, "ppl", "--model", str(tiny_dir), "--tokens", str(tmp_path / "ids.npy"), *argv
    )
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_ppl_rejects_out_of_range_and_non_integer_ids(capsys, tmp_path, tiny_dir):
    np.save(tmp_path / "big.npy", np.array([1, 2, 500]))
    code, _, err = _run(
        capsys, "ppl", "--model", str(tiny_dir), "--tokens", str(tmp_path / "big.npy")
    )
    assert code == 2 and "token ids must be in [0, 97)" in err
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    code, _, err = _run(
        capsys, "ppl", "--model", str(tiny_dir), "--tokens", str(tmp_path / "float.npy")
    )
    assert code == 2 and "expected integer token ids" in err


def test_ppl_writes_nothing_on_error(capsys, tmp_path, tiny_dir):
    out = tmp_path / "out"
    code, _, _ = _run(
        capsys,
        "ppl",
        "--model",
        str(tiny_dir),
        "--tokens",
        str(tmp_path / "missing.npy"),
        "--out",
        str(out),
    )
    assert code == 2 and not out.exists()


def test_ppl_runs_on_a_tiny_model(capsys, tmp_path, tiny_dir):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 97, 200))
    code, _out, err = _run(capsys, "ppl", "--model", str(tiny_dir), "--tokens", str(tmp_path / "ids.npy"),
                          "--mode", "sink", "window", "dense", "--sinks", "2", "--window", "10",
                          "--chunk", "16", "--json", "--quiet", "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 0, err
    for mode in ("sink", "window", "dense"):
        assert np.load(tmp_path / "o" / f"nll_{mode}.npy").shape == (199,)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "t1", "--top-k", "-1"], "top-k"),
        (["--prompt", "t1", "--top-p", "1.5"], "top-p"),
        (["--prompt", "t1", "--mode", "window", "--window", "0"], "window must be >= 1"),
        (["--prompt", "t1", "--window", "0"], "window must be >= 1"),
        (["--prompt", "t1", "--sinks", "-1"], "sinks must be >= 0"),
        (["--prompt", "t1", "--top-p", "0"], "top-p"),
        (["--prompt", "t1", "--temperature", "-1"], "temperature"),
        (["--prompt", "t1", "--max-new-tokens", "0"], "max-new-tokens"),
        (["--prompt", "t1", "--chunk", "0"], "chunk"),
    ],
)
def test_generate_bad_flags(capsys, tiny_dir, argv, message):
    code, _out, err = _run(capsys, "generate", "--model", str(tiny_dir), *argv)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_generate_unknown_flag_is_a_usage_error(capsys, tiny_dir):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", str(tiny_dir), "--prompt", "t1", "--bogus"])
    assert e.value.code == 2


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "empty"), "--prompt", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_corrupt_weights(capsys, tmp_path, tiny_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = _run(capsys, "generate", "--model", str(bad), "--prompt", "t1")
    assert code == 2 and "corrupt weights file" in err and "model.safetensors" in err, err
