"""Every family transformers has a config class for, saved by the installed transformers from
its own default config at tiny sizes with non-default widths, converts and matches transformers'
dense logits. A newer transformers that writes new keys into its configs (as 5.x's Falcon
writes `num_key_value_heads`) or builds a width its config does not state (MPT) fails here;
and the derived keys it writes are refused when they disagree."""

from __future__ import annotations

import json

import pytest
import transformers

import jaxsink
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.convert.families import FAMILIES
from tests.support.family_checks import assert_dense_matches_pytorch
from tests.support.hf_tiny import VOCAB, build_from_config

pytestmark = pytest.mark.torch

# Sizes every config class takes (under these names or through its attribute_map), and widths
# unlike the defaults' proportions, set where the class declares the key: a head_dim other
# than hidden_size / heads, an MLP width other than 4 x hidden_size.
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
WIDTHS = dict(
    num_key_value_heads=2,
    head_dim=12,
    intermediate_size=40,
    moe_intermediate_size=24,
    ffn_hidden_size=40,
    n_inner=40,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Keys one family derives itself (Falcon: `num_key_value_heads` from its layout).
DERIVED = {"falcon": {"num_key_value_heads"}}
# Keys of one family past the generic ones above.
OWN = {
    "gptj": dict(rotary_dim=4),
    # transformers builds MPT's MLP 4 x d_model wide whatever the config says
    "mpt": dict(expansion_ratio=2),
}
CASES = sorted(a for a in FAMILIES if a in transformers.CONFIG_MAPPING)


def tiny_config(arch: str):
    """`arch`'s default transformers config at tiny sizes with non-default widths."""
    cls = transformers.CONFIG_MAPPING[arch]
    declared = cls().to_dict()
    skip = DERIVED.get(arch, set())
    widths = {k: v for k, v in WIDTHS.items() if k in declared and k not in skip}
    return cls(**TINY, **widths, **OWN.get(arch, {}))


@pytest.mark.parametrize("arch", CASES)
def test_default_config_converts_and_matches(tmp_path, arch):
    config = tiny_config(arch)
    kernel = "sdpa" if arch == "falcon" else "eager"  # eager Falcon adds ALiBi twice
    torch_model = build_from_config(config, tmp_path / "src", kernel)
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert_dense_matches_pytorch(torch_model, jaxsink.load(tmp_path / "out"))


def test_mpt_width_comes_from_the_weights(tmp_path):
    """The config says expansion_ratio 2; transformers' weights are 4 x d_model wide."""
    build_from_config(tiny_config("mpt"), tmp_path / "src")
    assert json.loads((tmp_path / "src" / "config.json").read_text())["expansion_ratio"] == 2
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert {layer.mlp.size for layer in jaxsink.load(tmp_path / "out").cfg.layers} == {4 * 32}


@pytest.mark.parametrize(
    ("layout", "right", "wrong"),
    [(dict(), 1, 4), (dict(new_decoder_architecture=True, num_kv_heads=2), 2, 1)],
    ids=["rw-mqa", "new-gqa"],
)
def test_falcon_derived_kv_heads_that_disagree_are_refused(tmp_path, capsys, layout, right, wrong):
    """transformers 5 writes `num_key_value_heads` (1 for multi-query RW, else `num_kv_heads`);
    a value that disagrees with the layout is refused with both values named."""
    build_from_config(transformers.FalconConfig(**TINY, **layout), tmp_path / "src", "sdpa")
    config_file = tmp_path / "src" / "config.json"
    config = json.loads(config_file.read_text())
    assert config.get("num_key_value_heads", right) == right  # absent before transformers 5
    config["num_key_value_heads"] = wrong
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"num_key_value_heads = {wrong} disagrees with {right}" in err
    assert not (tmp_path / "out").exists()
