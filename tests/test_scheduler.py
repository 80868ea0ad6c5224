"""The serving scheduler driven turn by turn in-process: a session's turn whose client leaves
before its row was given is taken back from the conversation, and one whose client leaves while
its prompt is fed is fed to its end, so that a session's conversation and its stream always hold
the same turns."""

from __future__ import annotations

import pytest

import jaxsink
from jaxsink.config import StreamConfig
from jaxsink.engine import Engine, RowSampling
from jaxsink.scheduler import Job, Scheduler
from tests.support.tiny import chat_checkpoint

STREAM = StreamConfig(2, 61)
GREEDY = RowSampling(max_tokens=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return jaxsink.load(chat_checkpoint(tmp_path_factory.mktemp("sched")))


def one_row(model, home, prefill_tokens: int = 64) -> Scheduler:
    """A scheduler on a 1-row engine, not started: the test turns its loop."""
    engine = Engine(model, 1, STREAM, chunk=4, block=3)
    return Scheduler(engine, home / "sessions", prefill_tokens=prefill_tokens)


def submit(scheduler: Scheduler, sampling=GREEDY, **request) -> tuple[Job, list]:
    """A job submitted and accepted (tokenized, queued); (the job, the events it got)."""
    events: list = []
    job = Job(sampling=sampling, emit=events.append, **request)
    scheduler.submit(job)
    scheduler._turn(block=False)
    return job, events


def run_out(scheduler: Scheduler, events: list, turns: int = 200) -> list:
    """Turn the loop until the job of `events` is done; its reply's tokens."""
    for _ in range(turns):
        if any(e.kind in ("done", "error") for e in events):
            break
        scheduler._turn(block=False)
    assert events[-1].kind == "done", events[-1]
    return [t for e in events for t in e.tokens]


def turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_turn_left_while_queued_is_taken_back(tiny, tmp_path):
    s = one_row(tiny, tmp_path)
    busy, _ = submit(s, RowSampling(max_tokens=40), prompt="t1 t2 t3")
    s._turn(block=False)
    assert busy.row is not None  # the only row decodes it
    left, _ = submit(s, messages=turn("t7 t8"), session="chat")
    assert left in s.waiting and s.sessions["chat"].conversation.messages
    left.cancelled.set()
    s._turn(block=False)
    assert left not in s.waiting
    conversation = s.sessions["chat"].conversation
    assert conversation.messages == [] and conversation.consumed == ""
    busy.cancelled.set()
    s._turn(block=False)
    _, events = submit(s, messages=turn("t9"), session="chat")
    got = run_out(s, events)
    fresh = one_row(tiny, tmp_path / "fresh")
    _, want_events = submit(fresh, messages=turn("t9"), session="chat")
    assert got == run_out(fresh, want_events)
    assert events[0].prompt_tokens == want_events[0].prompt_tokens


def test_a_turn_left_while_its_prompt_is_fed_is_fed_to_its_end(tiny, tmp_path):
    s = one_row(tiny, tmp_path, prefill_tokens=4)  # one chunk of 4 tokens a step
    words = " ".join(f"t{i}" for i in range(5, 30))
    job, events = submit(s, messages=turn(words), session="chat")
    s._turn(block=False)
    assert 0 < job.fed < len(job.ids)
    job.cancelled.set()
    for _ in range(100):
        if job.row is None:
            break
        s._turn(block=False)
    session = s.sessions["chat"]
    assert session.tokens == len(job.ids)  # the stream holds the whole turn
    assert session.conversation.messages[-1] == {"role": "assistant", "content": ""}
    assert [e.kind for e in events] == ["accepted"]
    _, events = submit(s, messages=turn("t9"), session="chat")
    reply = run_out(s, events)
    assert s.sessions["chat"].tokens == len(job.ids) + events[0].prompt_tokens + len(reply)
