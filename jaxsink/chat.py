"""A multi-turn chat on one endless sink stream (`jaxsink chat`).

Every turn goes on in the same engine row: the user's message is rendered with the model's chat
template and only what it adds to the stream is prefilled (`jaxsink.conversation`); the reply
is decoded a block at a time and streamed out as text. The stream never restarts, so however
long the chat gets the cache holds its first tokens (the sinks) and its most recent window.
With `keep_system` the sinks are the whole system prompt (S = its token count), so the model
never loses it.

A reply can be stopped between two decode blocks (Ctrl-C in the command): the tokens it has
are in the cache and its text is recorded as the assistant's message, so the next turn
continues a consistent conversation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import jax
import numpy as np

from jaxsink import settings
from jaxsink.checkpoint import CheckpointError
from jaxsink.config import CACHE_DTYPES, ConfigError, JaxsinkError, StreamConfig, one_line
from jaxsink.conversation import Conversation
from jaxsink.engine import Engine, RowSampling
from jaxsink.loading import Model
from jaxsink.row_text import RowText
from jaxsink.stream_state import (
    SavedStream,
    StreamFileError,
    StreamInfo,
    load_stream,
    save_stream,
)
from jaxsink.tokenizer import no_tokenizer_message


@dataclasses.dataclass(frozen=True)
class ChatSettings:
    """How a chat runs.

    system: the system prompt (None: the template's own default, if it has one); keep_system:
    the system prompt is the sinks (S = its token count, `sinks` unused); max_new_tokens: per
    reply; temperature, top_k, top_p, seed: as `RowSampling`; sinks, window: the stream's cache;
    chunk, block, cache_dtype: as `Engine`.
    """

    system: str | None = None
    keep_system: bool = False
    max_new_tokens: int = settings.CHAT_DEFAULTS["max_new_tokens"]
    temperature: float = settings.CHAT_DEFAULTS["temperature"]
    top_k: int = settings.CHAT_DEFAULTS["top_k"]
    top_p: float = settings.CHAT_DEFAULTS["top_p"]
    seed: int = settings.CHAT_DEFAULTS["seed"]
    sinks: int = 4
    window: int = 1020
    policy: str = "sink"
    recent: int | None = None
    chunk: int = settings.CHAT_DEFAULTS["chunk"]
    block: int = settings.CHAT_DEFAULTS["block"]
    cache_dtype: str | None = None

    def __post_init__(self):
        if self.keep_system and not self.system:
            raise ConfigError(
                "--keep-system keeps the system prompt as the sinks: give one with --system"
            )
        settings.check_flags(
            {name: getattr(self, name) for name in ("max_new_tokens", "chunk", "block")}
        )
        self.stream(self.sinks)
        self.sampling()

    def stream(self, sinks: int) -> StreamConfig:
        """The chat's cache with `sinks` sinks (the system prompt's length with keep_system)."""
        return StreamConfig.for_mode("sink", sinks, self.window, None, self.policy, self.recent)

    def sampling(self) -> RowSampling:
        return RowSampling(self.temperature, self.top_k, self.top_p, self.seed, self.max_new_tokens)


def resolve_settings(flags: dict, saved: StreamInfo | None = None) -> ChatSettings:
    """A chat's settings from its command-line values (`flags`: field name -> value, None where
    not given): a flag given wins, else the saved chat's value (`saved`: its header, for
    `--load`), else the default. A saved chat keeps its layout (sinks, window, cache dtype) and
    system prompt: a flag that contradicts them is a ConfigError, and so is `--sinks` with
    `--keep-system`."""
    given = {name: value for name, value in flags.items() if value is not None}
    if given.get("keep_system") and "sinks" in given:
        raise ConfigError("--keep-system makes the system prompt the sinks: drop --sinks")
    if saved is None:
        return ChatSettings(**given)
    if "conversation" not in (saved.state.get("extra") or {}):
        raise StreamFileError(
            "the --load file is a saved stream, not a saved chat: go on with it with "
            "jaxsink generate --resume"
        )
    layout = {
        "sinks": saved.stream.sinks,
        "window": saved.stream.window,
        "policy": saved.stream.policy,
        "recent": saved.stream.recent if saved.stream.policy == "h2o" else None,
        "cache_dtype": saved.cache_dtype,
        "system": saved.settings.get("system"),
        "keep_system": bool(saved.settings.get("keep_system")),
    }
    for name, value in layout.items():
        if name in given and given[name] != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} differs from the saved chat's ({value!r}): a chat keeps its layout and "
                f"system prompt; drop {flag} or start a new chat"
            )
    fields = {f.name for f in dataclasses.fields(ChatSettings)}
    kept = {name: value for name, value in saved.settings.items() if name in fields}
    try:
        return ChatSettings(**(kept | layout | given))
    except TypeError as e:  # a value of the wrong type in the file's settings
        raise StreamFileError(f"the --load file has corrupt chat settings ({e})") from None


@dataclasses.dataclass
class ReplyStats:
    """One turn's figures: the tokens it prefilled and how long that took, the reply's token
    ids (an EOS that ended it included) and its decode time, and why it ended ("eos",
    "max_new_tokens" or "stopped")."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    token_ids: list[int] = dataclasses.field(default_factory=list)
    decode_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.token_ids) / self.decode_s if self.decode_s else 0.0


class Chat:
    """A conversation on one engine row: `reply(message)` streams the answer to each user turn,
    `reset` starts a fresh stream, `save`/`load` keep and resume the whole chat.

    The stream (`stream`: sinks + window) and the system prompt are fixed for the chat's life;
    `reset` starts again from the same system prompt. ConfigError when the model has no chat
    template.
    """

    def __init__(self, model: Model, settings: ChatSettings = ChatSettings()):
        tok = model.tokenizer
        if tok.vocab_size is None:
            raise CheckpointError(no_tokenizer_message(model.path))
        if not tok.chat_template:
            raise ConfigError(
                "this model has no chat template, which jaxsink chat needs: use jaxsink "
                "generate for plain text"
            )
        self.model, self.settings = model, settings
        self.conversation = Conversation(tok, settings.system)
        system_ids = self.conversation.system_ids() if settings.system else []
        sinks = len(system_ids) if settings.keep_system else settings.sinks
        self.stream = settings.stream(sinks)
        self.engine = Engine(
            model, 1, self.stream, settings.chunk, settings.block, settings.cache_dtype
        )
        self.last = ReplyStats()
        self._start(system_ids)

    def _start(self, system_ids: list[int]) -> None:
        """Open the row's stream: position 0, the seed's key, the system prompt fed."""
        self.engine.open(self.settings.sampling())
        if system_ids:
            self.engine.feed(0, system_ids)

    def reset(self) -> None:
        """Drop the conversation: a fresh stream that starts with the same system prompt."""
        self.engine.release(0)
        self.conversation = Conversation(self.model.tokenizer, self.settings.system)
        self.last = ReplyStats()
        self._start(self.conversation.system_ids() if self.settings.system else [])

    def reply(self, message: str) -> Iterator[str]:
        """Feed `message` as the user's next turn and stream the reply: yields the text each
        decode block adds (possibly empty, so a consumer can stop between blocks). Closing the
        iterator early (`close()`) stops the reply there; either way its text is recorded as
        the assistant's message and its figures are in `last`."""
        engine, stats = self.engine, ReplyStats()
        self.last = stats
        ids = self.conversation.user_turn(message)
        start = time.perf_counter()
        engine.append(0, ids, self.settings.sampling())
        jax.block_until_ready(engine.logits)
        stats.prompt_tokens, stats.prefill_s = len(ids), time.perf_counter() - start
        reply = RowText(self.model.tokenizer, engine.eos_ids)
        stats.token_ids = reply.tokens
        try:
            while engine.live[0]:
                start = time.perf_counter()
                new = engine.decode()[0]
                stats.decode_s += time.perf_counter() - start
                yield reply.push(new)
        finally:
            stopped = bool(engine.live[0])
            if stopped:
                engine.halt(0)
            tail = reply.finish()
            self.conversation.assistant_reply(reply.text)
            stats.stop_reason = "stopped" if stopped else reply.reason or "max_new_tokens"
        if tail:
            yield tail

    def tokens_seen(self) -> int:
        """The stream index: every token the stream has consumed."""
        return self.engine.positions()[0]

    def stats(self) -> dict:
        """Where the stream stands (tokens seen, cache slots in use of its capacity) and the last
        reply's figures."""
        seen, last = self.tokens_seen(), self.last
        return {
            "tokens_seen": seen,
            "cache_slots_used": min(seen, self.stream.capacity),
            "cache_slots": self.stream.capacity,
            "reply_tokens": len(last.token_ids),
            "decode_tokens_per_s": last.decode_tokens_per_s,
            "stop_reason": last.stop_reason,
            "prompt_tokens": last.prompt_tokens,
            "prefill_tokens_per_s": last.prefill_tokens_per_s,
        }

    def saved(self) -> SavedStream:
        """The whole chat: the stream as it stands (after the last reply), the settings and the
        conversation (in `extra`)."""
        return SavedStream(
            row=self.engine.export(0),
            settings=dataclasses.asdict(self.settings),
            decoder={},
            extra={"conversation": self.conversation.state()},
        )

    def save(self, path: str | Path) -> Path:
        return save_stream(Path(path).expanduser(), self.saved(), self.model)

    def load(self, path: str | Path) -> None:
        """Go on with a chat saved from this model with this chat's layout (StreamFileError
        saying what differs otherwise; the current chat is then kept)."""
        path = Path(path).expanduser()
        self.restore(load_stream(path, self.model), str(path))

    def restore(self, saved: SavedStream, where: str = "the saved chat") -> None:
        """Continue `saved` (see `load`) in place of the current conversation."""
        state = saved.extra.get("conversation")
        if not isinstance(state, dict):
            raise StreamFileError(f"{where} is a saved stream, not a saved chat")
        try:
            conversation = Conversation(self.model.tokenizer).restore(state)
        except ValueError as e:
            raise StreamFileError(f"{where}: {e}") from None
        ours = self.engine.cache.dtype
        if saved.stream != self.stream or np.dtype(CACHE_DTYPES[saved.cache_dtype]) != ours:
            raise StreamFileError(
                f"{where} holds a chat with sinks {saved.stream.sinks}, window "
                f"{saved.stream.window} and a {saved.cache_dtype} cache, this one has sinks "
                f"{self.stream.sinks}, window {self.stream.window} and a {np.dtype(ours)} cache: "
                f"start jaxsink chat --load {where} to go on with it"
            )
        self.engine.release(0)
        self.engine.restore(saved.row, self.settings.sampling())
        self.conversation, self.last = conversation, ReplyStats()

    def banner(self) -> str:
        s = self.stream
        kept = ", the system prompt kept as the sinks" if self.settings.keep_system else ""
        return (
            f"jaxsink chat with {self.model.path.name}: sinks {s.sinks} + window {s.window}"
            f"{kept}. /help lists the commands; Ctrl-D ends the chat."
        )


HELP = """\
/reset       a fresh stream, with the same system prompt
/stats       tokens seen, cache fill, the last reply's speed
/save PATH   save the chat (its stream after the last reply)
/load PATH   go on with a chat saved from this model with the same sinks and window
/help        this list
/quit        end the chat (so do Ctrl-D and, at the prompt, Ctrl-C)
Ctrl-C while a reply streams stops the reply."""


def format_stats(stats: dict) -> str:
    """`Chat.stats` in one line."""
    line = "tokens seen {tokens_seen}, cache {cache_slots_used}/{cache_slots} slots"
    if stats["stop_reason"]:
        line += (
            "; last reply {reply_tokens} tokens at {decode_tokens_per_s:.1f} tok/s "
            "({stop_reason}), its turn {prompt_tokens} tokens prefilled at "
            "{prefill_tokens_per_s:.1f} tok/s"
        )
    return line.format(**stats)


def _command(chat: Chat, line: str, err: TextIO) -> bool:
    """Run one /command, answering on `err`; False for /quit. A failed /save or /load says why
    in one line and the chat goes on."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name == "/quit":
            return False
        if name == "/help":
            answer = HELP
        elif name == "/reset":
            chat.reset()
            answer = "a fresh stream"
        elif name == "/stats":
            answer = format_stats(chat.stats())
        elif name in ("/save", "/load") and not arg:
            answer = f"usage: {name} PATH"
        elif name == "/save":
            answer = f"saved the chat to {chat.save(arg)}"
        elif name == "/load":
            chat.load(arg)
            answer = f"loaded {arg}: {chat.tokens_seen()} tokens seen"
        else:
            answer = f"unknown command {name}: /help lists the commands"
    except (JaxsinkError, OSError) as e:
        answer = f"error: {one_line(e)}"
    err.write(answer + "\n")
    err.flush()
    return True


def _stream_reply(chat: Chat, message: str, out: TextIO) -> None:
    """Write the reply to `message` to `out` as it comes, then a newline. Ctrl-C meanwhile stops
    the reply at the end of the decode block: SIGINT only sets a flag, because a
    KeyboardInterrupt raised inside an engine step could lose its donated cache."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        with contextlib.closing(chat.reply(message)) as pieces:
            for piece in pieces:
                out.write(piece)
                out.flush()
                if interrupted:
                    break
    finally:
        signal.signal(signal.SIGINT, previous)
    out.write("\n")
    out.flush()


def run(chat: Chat, lines: Iterable[str], out: TextIO, err: TextIO) -> None:
    """The chat loop: each line is a user turn, its reply streamed to `out`, or a /command,
    answered on `err` (so `out` holds the replies alone). Empty lines are skipped. Ends at
    /quit or when `lines` does."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(chat, text, err):
                return
        else:
            _stream_reply(chat, text, out)


def prompted_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed at a terminal after `prompt`, with readline's editing and history where
    Python has it, until EOF (Ctrl-D) or a Ctrl-C at the prompt."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what makes input() edit lines)
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            return
