"""`jaxsink chat` on the real default model: the turns are one stream, a stopped reply keeps
the conversation consistent, /commands, piped stdin and a terminal session (pexpect)."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import jaxsink
from jaxsink import cli, executables
from jaxsink.chat import Chat, ChatSettings, prompted_lines, resolve_settings, run
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.conversation import Conversation
from jaxsink.stream_state import StreamFileError, read_stream_info

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
# The system prompt as the sinks and a window small enough that two turns wrap the ring.
SETTINGS = ChatSettings(system=SYSTEM, keep_system=True, window=32, max_new_tokens=10, block=16)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, jaxsink_test_home):
    # As the CLI does, so a rerun reads the chat's executables back instead of compiling them
    # (tens of seconds on two cores).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXSINK_HOME", str(jaxsink_test_home))
        executables.use_compilation_cache()
    return jaxsink.load(smollm2_dir)


@pytest.fixture(scope="module")
def saved_chat(smollm2, tmp_path_factory):
    chat = Chat(smollm2, SETTINGS)
    list(chat.reply("Hi"))
    return chat.save(tmp_path_factory.mktemp("saved") / "chat")


def _env(home, **extra):
    """The environment of a `jaxsink chat` child: this repository's jaxsink, the test home."""
    return {**os.environ, "JAXSINK_HOME": str(home), "PYTHONPATH": str(ROOT)} | extra


def _greedy_continuation(model, ids, stream, max_new_tokens):
    """`jaxsink.generate` of token ids from a fresh stream: the reference a chat turn must equal."""
    gen = jaxsink.generate(
        model, ids, max_new_tokens=max_new_tokens, sinks=stream.sinks, window=stream.window,
        block=SETTINGS.block,
    )  # fmt: skip
    text = "".join(gen)
    return gen.token_ids, text


def _fed(chat, token_ids):
    """A reply's tokens that entered the stream (all but an EOS that ended it)."""
    return [t for t in token_ids if t not in chat.engine.eos_ids]


def test_turns_are_one_stream_with_the_system_prompt_as_sinks(smollm2):
    chat = Chat(smollm2, SETTINGS)
    conversation = Conversation(smollm2.tokenizer, SYSTEM)
    ids = conversation.system_ids()
    assert chat.stream == StreamConfig(len(ids), 32)
    for message in ("What is the capital of France?", "And what is the capital of Italy?"):
        delta = conversation.user_turn(message)
        ids += delta
        text = "".join(chat.reply(message))
        assert chat.last.prompt_tokens == len(delta)  # only the new turn is prefilled
        assert (chat.last.token_ids, text) == _greedy_continuation(smollm2, ids, chat.stream, 10)
        ids += _fed(chat, chat.last.token_ids)
        conversation.assistant_reply(text)
        assert chat.tokens_seen() == len(ids)
    assert chat.conversation.state() == conversation.state()
    assert chat.tokens_seen() > chat.stream.capacity  # the ring wrapped, the chat went on


def test_a_stopped_reply_is_recorded_and_the_next_turn_continues_it(smollm2):
    chat = Chat(smollm2, dataclasses.replace(SETTINGS, max_new_tokens=40))
    pieces = chat.reply("Tell me a long story about a dragon.")
    assert next(p for p in pieces if p)
    pieces.close()
    stopped = chat.last.token_ids
    assert chat.last.stop_reason == "stopped" and len(stopped) < 40
    partial = smollm2.tokenizer.decode(stopped, skip_special_tokens=True)
    assert chat.conversation.messages[-1] == {"role": "assistant", "content": partial}

    conversation = Conversation(smollm2.tokenizer, SYSTEM)
    ids = conversation.system_ids()
    ids += conversation.user_turn("Tell me a long story about a dragon.") + stopped
    conversation.assistant_reply(partial)
    ids += conversation.user_turn("What is its name?")
    text = "".join(chat.reply("What is its name?"))
    assert (chat.last.token_ids, text) == _greedy_continuation(smollm2, ids, chat.stream, 40)


def test_commands(smollm2, tmp_path):
    chat = Chat(smollm2, SETTINGS)
    (tmp_path / "junk").write_text("not a stream")
    lines = [
        "What is the capital of France?",
        "",
        "/stats",
        f"/save {tmp_path / 'chat.safetensors'}",
        "/reset",
        "/stats",
        f"/load {tmp_path / 'nope'}",
        f"/load {tmp_path / 'junk'}",
        f"/load {tmp_path / 'chat.safetensors'}",
        "/stats",
        "/frobnicate",
        "/quit",
        "never read",
    ]
    out, err = io.StringIO(), io.StringIO()
    run(chat, lines, out, err)
    assert out.getvalue().count("\n") == 1 and "Paris" in out.getvalue()
    answers = err.getvalue().splitlines()
    seen = int(answers[0].split()[2].rstrip(","))
    assert seen > chat.stream.sinks
    assert answers[0].startswith(f"tokens seen {seen}, cache {min(seen, 49)}/49 slots; last reply")
    assert answers[1].startswith("saved the chat to")
    assert answers[2] == "a fresh stream"
    assert answers[3].startswith(f"tokens seen {chat.stream.sinks}, ")
    assert answers[4].startswith("error: no saved stream at")
    assert answers[5].startswith("error:") and "not a saved jaxsink stream" in answers[5]
    assert answers[6] == f"loaded {tmp_path / 'chat.safetensors'}: {seen} tokens seen"
    assert answers[7].startswith(f"tokens seen {seen}, ")
    assert answers[8].startswith("unknown command /frobnicate")
    assert len(answers) == 9

    other = chat.saved()
    other.row.cache = other.row.cache.replace(stream=StreamConfig(4, 45))
    with pytest.raises(StreamFileError, match="sinks 4, window 45"):
        chat.restore(other)
    assert chat.tokens_seen() == seen  # the chat goes on
    assert "Paris" in "".join(chat.reply("Which city did you name?"))


def test_piped_stdin_gives_one_reply_per_line(smollm2_dir, jaxsink_test_home):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsink.cli", "chat", "--model", str(smollm2_dir),
         "--max-new-tokens", "20", "--temperature", "0"],
        input="What is the capital of France?\n\nWhat is the capital of Italy?\n/stats\n",
        env=_env(jaxsink_test_home), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert "Paris" in first and "Rome" in second
    assert "tokens seen" in proc.stderr and "> " not in proc.stdout


# pexpect forks this (multithreaded) process; the child only execs the command.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_terminal_session(smollm2_dir, jaxsink_test_home, tmp_path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "jaxsink.cli", "chat", "--model", str(smollm2_dir), "--max-new-tokens", "300"],
        env=_env(jaxsink_test_home, TERM="dumb"), encoding="utf-8", timeout=120,
    )  # fmt: skip

    def say(line):
        child.expect_exact("> ")
        child.sendline(line)
        child.expect_exact(line)  # the terminal's echo

    child.expect_exact("/help lists the commands")
    say("What is the capital of France? Answer in one word.")
    child.expect("Paris")
    say("/stats")
    child.expect(r"tokens seen (\d+),")
    seen = child.match.group(1)
    say(f"/save {tmp_path / 'chat'}")
    child.expect_exact("saved the chat")
    say("/reset")
    say("/stats")
    child.expect_exact("tokens seen 0,")
    say(f"/load {tmp_path / 'chat'}")
    say("/stats")
    child.expect_exact(f"tokens seen {seen},")
    say("Write a long story about a brave knight and a dragon.")
    child.expect(r"\w+ \w+ \w+")  # the reply has started
    child.sendintr()
    say("/stats")
    child.expect_exact("(stopped)")
    say("What is the capital of Italy? Answer in one word.")
    child.expect("Rome")
    say("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _typed(*entries):
    """A stand-in for input(): returns each string, raises each exception class."""
    entries = iter(entries)

    def fake_input(prompt):
        entry = next(entries)
        if isinstance(entry, type):
            raise entry
        return entry

    return fake_input


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_eof_or_ctrl_c_at_the_prompt_ends_the_chat(monkeypatch, end):
    monkeypatch.setattr("builtins.input", _typed("Hi", end, "never read"))
    assert list(prompted_lines()) == ["Hi"]


def test_a_saved_chat_keeps_its_layout_and_system_prompt(smollm2, saved_chat):
    info = read_stream_info(saved_chat)
    settings = resolve_settings({"temperature": 0.5}, info)
    S = len(Conversation(smollm2.tokenizer, SYSTEM).system_ids())
    assert settings == dataclasses.replace(
        SETTINGS, temperature=0.5, sinks=S, cache_dtype="float32"
    )
    for flags in ({"window": 33}, {"system": "Be rude."}, {"cache_dtype": "bfloat16"}):
        with pytest.raises(ConfigError, match="differs from the saved chat's"):
            resolve_settings(flags, info)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-system"], "--keep-system keeps the system prompt as the sinks"),
        (["--keep-system", "--system", "Hi", "--sinks", "2"], "drop --sinks"),
        (["--window", "0"], "window must be >= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
        (["--top-p", "0"], "top-p"),
        (["--load", "{tmp}/nope"], "no saved stream at"),
        (["--load", "{tmp}/junk"], "not a saved jaxsink stream"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, smollm2_dir, flags, message):
    (tmp_path / "junk").write_text("not a stream")
    flags = [f.format(tmp=tmp_path) for f in flags]
    code = cli.main(["chat", "--model", str(smollm2_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jaxsink chat: error:"), err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--window", "33"], "--window differs from the saved chat's (32)"),
        (["--dtype", "bfloat16"], "was saved with --dtype float32"),
    ],
)
def test_load_of_another_layout_or_model_exits_2(capsys, smollm2_dir, saved_chat, flags, message):
    code = cli.main(["chat", "--model", str(smollm2_dir), "--load", str(saved_chat), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_model_without_chat_template_is_refused(smollm2):
    tokenizer = copy.copy(smollm2.tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        Chat(dataclasses.replace(smollm2, tokenizer=tokenizer))
