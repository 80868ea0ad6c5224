"""The stream settings are declared once (`jaxsink.settings`): the flags of `jaxsink generate`
and `jaxsink chat`, their defaults, the checks of every settings object and the types a saved
stream's header must hold all follow the one table."""

from __future__ import annotations

import dataclasses

import pytest

from jaxsink import settings
from jaxsink.chat import ChatSettings
from jaxsink.cli import CHAT_FLAGS, GENERATE_DEFAULTS, build_parser
from jaxsink.config import ConfigError
from jaxsink.engine import RowSampling
from jaxsink.generate import Sampling
from jaxsink.stream_state import SETTING_TYPES


def test_flags_and_defaults_follow_the_table():
    parser = build_parser()
    generate = vars(parser.parse_args(["generate"]))
    chat = vars(parser.parse_args(["chat"]))
    # every setting is a generate flag, unset (None) so that a resumed stream's value can win
    assert all(generate[name] is None for name in settings.SETTINGS)
    assert {n: GENERATE_DEFAULTS[n] for n in settings.SETTINGS} == settings.defaults(
        settings.SETTINGS
    )
    assert all(chat[name] is None for name in settings.CHAT_DEFAULTS)
    assert set(settings.CHAT_DEFAULTS) <= set(CHAT_FLAGS)
    fields = {f.name: f.default for f in dataclasses.fields(ChatSettings)}
    assert {n: fields[n] for n in settings.CHAT_DEFAULTS} == settings.CHAT_DEFAULTS
    assert settings.CHAT_DEFAULTS["max_new_tokens"] == 256  # a chat's own default
    help_text = parser._subparsers._group_actions[0].choices["chat"].format_help()
    assert "(default 256)" in help_text and "(default 4)" in help_text
    assert {n: s.kind for n, s in settings.SETTINGS.items()} == SETTING_TYPES


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("temperature", -0.5, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be >= 0"),
        ("top_k", -1, "top-k must be >= 0"),
        ("top_p", 0.0, "top-p must be in (0, 1]"),
        ("top_p", 1.5, "top-p must be in (0, 1]"),
    ],
)
def test_every_settings_object_checks_by_the_table(name, bad, message):
    """`Sampling`, `RowSampling` and `ChatSettings` refuse the same value with the same
    message, and accept the edges of each range."""
    for make in (Sampling, RowSampling, ChatSettings):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
            make(**{name: bad})
    assert Sampling(temperature=0.0, top_k=0, top_p=1.0) == Sampling()
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\^32\)"):
        RowSampling(seed=2**32)
    with pytest.raises(ConfigError, match="--block must be >= 1"):
        ChatSettings(block=0)
