"""The settings a stream runs with, declared once: each one's name, JSON type, default, valid
range and help.

The command-line flags of `jaxsink generate` and `jaxsink chat` (`add_flags`), the checks of
`Sampling`, `RowSampling` and `ChatSettings` (`check`), the defaults a resumed stream falls
back on, and the types a saved stream's settings header must have (`jaxsink.stream_state`)
are all made from `SETTINGS`. The stream's layout (mode, sinks, window, cache dtype) is not a
setting: `StreamConfig` checks it, and a stream keeps it for good.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from jaxsink.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. kind: its JSON type (int, float, bool, or list of strings); valid: whether
    a value is in range (None: any), said as `rule` in the error; help: the flag's help, which
    gets the default appended."""

    name: str
    kind: type
    default: Any
    help: str
    valid: Callable[[Any], bool] | None = None
    rule: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value, label: str | None = None) -> None:
        """ConfigError "<label> <rule>, got <value>" when `value` is out of range; label: the
        name the caller's user knows it by (default: the flag's words)."""
        if self.valid is not None and not self.valid(value):
            label = label or self.name.replace("_", "-")
            raise ConfigError(f"{label} {self.rule}, got {value!r}")


def _at_least_one(v) -> bool:
    return v >= 1


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("max_new_tokens", int, 64, "new tokens at most", _at_least_one, "must be >= 1"),
        # (NaN is in no range: every `valid` refuses it)
        Setting("temperature", float, 0.0, "0 = greedy", lambda v: v >= 0, "must be >= 0"),
        Setting(
            "top_k",
            int,
            0,
            "keep the k most likely tokens; 0 = off",
            lambda v: v >= 0,
            "must be >= 0",
        ),
        Setting(
            "top_p",
            float,
            1.0,
            "keep the most likely tokens of this much mass; 1 = off",
            lambda v: 0 < v <= 1,
            "must be in (0, 1]",
        ),
        Setting(
            "seed",
            int,
            0,
            "the sampling's random seed",
            lambda v: 0 <= v < 2**32,
            "must be in [0, 2^32)",
        ),
        Setting("chunk", int, 64, "prefill chunk length C", _at_least_one, "must be >= 1"),
        Setting("block", int, 16, "decode steps per device loop", _at_least_one, "must be >= 1"),
        Setting("stop", list, [], "stop string (repeatable)"),
        Setting("chat", bool, False, "wrap the prompt in the model's chat template"),
    )
}

SAMPLING = ("temperature", "top_k", "top_p")  # how the next token is drawn (`Sampling`)


def check_flags(values: dict[str, Any]) -> None:
    """`check`, naming each setting by its command-line flag (`--max-new-tokens`)."""
    check(values, {name: SETTINGS[name].flag for name in values})


def defaults(names: Iterable[str], **overrides) -> dict[str, Any]:
    """Each named setting's default, `overrides` (a command's own defaults) winning."""
    return {name: overrides.get(name, SETTINGS[name].default) for name in names}


# The settings a chat has (`jaxsink.chat.ChatSettings`), with its own defaults: longer replies,
# and text every 4 tokens (on CPU as fast as 16).
CHAT_DEFAULTS = defaults(
    ("max_new_tokens", *SAMPLING, "seed", "chunk", "block"), max_new_tokens=256, block=4
)


def check(values: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    """Check each named setting's value (ConfigError naming the first out of range); labels:
    the names the caller's user knows some of them by."""
    for name, value in values.items():
        SETTINGS[name].check(value, (labels or {}).get(name))


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str], **overrides) -> None:
    """A `--name` flag for each named setting, default None (so that a resumed stream's saved
    value, else the default, fills it in: `defaults`), its help naming the default
    (`overrides`: this command's own)."""
    for name, default in defaults(names, **overrides).items():
        s = SETTINGS[name]
        if s.kind is bool:
            parser.add_argument(s.flag, action="store_true", default=None, help=s.help)
        elif s.kind is list:
            parser.add_argument(s.flag, action="append", help=s.help)
        else:
            parser.add_argument(s.flag, type=s.kind, help=f"{s.help} (default {default})")


def saved_types(names: Iterable[str]) -> dict[str, type]:
    """The JSON type of each named setting, as a saved stream's header must hold it."""
    return {name: SETTINGS[name].kind for name in names}
