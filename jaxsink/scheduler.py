"""Continuous batching over the engine: many requests, `max_batch` rows, one thread.

One thread owns the `Engine` and loops: it takes new jobs, gives each a row when one is free,
and runs, while prompts wait, one prefill step (a chunk of each of the oldest prompts, up to
`prefill_tokens` tokens in all, padding included, first come first served) with one decode
step of the live rows (`Engine.step`), so prompts do not wait a whole block per chunk and the
decoding rows keep going; otherwise a decode block of the live rows. It streams each row's
text to its job. A job whose client went away
is dropped and its row freed at the next turn of the loop.

Sessions keep a conversation's stream between requests: when its reply is done the row is
parked, not reset, and the next request of the session feeds only its new message. A parked
row is given up when a new job needs it (least recently used first) or after `idle_s`: the
stream is saved with `jaxsink.stream_state` under `sessions_dir` and restored when the session
returns, bit for bit, even after a restart.

Callers talk to the thread through `submit` (thread-safe) and receive `Event`s through the
`emit` callable of their job.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jaxsink.config import ConfigError, JaxsinkError
from jaxsink.conversation import Conversation
from jaxsink.engine import Engine, RowSampling, check_ids, token_buckets
from jaxsink.prompt_cache import PromptCache
from jaxsink.row_text import RowText
from jaxsink.stream_state import (
    SavedStream,
    StreamFileError,
    load_stream,
    read_stream_info,
    save_stream,
)
from jaxsink.traced.rows import seed_key

SESSION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class RequestError(JaxsinkError):
    """A request the server refuses: `status` is its HTTP status, `param` the field at fault,
    `code` OpenAI's machine-readable code for it (such as "invalid_api_key"), when it has one."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclasses.dataclass
class Event:
    """What a job hears: "accepted" (prompt_tokens set), "text" (text and the tokens it
    completes, with log-probabilities), "done" (finish_reason, completion_tokens, and
    cached_tokens: the prompt tokens a cached state spared) or "error" (error: a
    RequestError)."""

    kind: str
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: RequestError | None = None


@dataclasses.dataclass
class Job:
    """One request. Either `prompt` (text or token ids: a completion) or `messages` (a chat
    turn: a session's new messages, or a whole conversation) is set.

    emit: called with each Event, from the scheduler thread; cancelled: set it when the client
    is gone (the row is freed at the next turn of the loop).
    """

    sampling: RowSampling
    emit: Callable[[Event], None]
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    session: str | None = None
    logprobs: int = 0
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # the scheduler's own bookkeeping
    ids: list[int] = dataclasses.field(default_factory=list)
    row: int | None = None
    fed: int = 0  # how many of `ids` the row has consumed
    cached: int = 0  # how many of them a cached state gave
    marks: list[int] = dataclasses.field(default_factory=list)  # fed counts to cache states at
    reply: RowText | None = None  # from its admission on
    undo: dict | None = None  # a session's conversation before this turn (`Conversation.state`)


@dataclasses.dataclass
class Session:
    """A conversation kept between requests: in a parked row, or saved under sessions_dir."""

    name: str
    conversation: Conversation | None  # None: a completions session (raw text)
    row: int | None = None
    busy: bool = False
    last_used: float = 0.0
    tokens: int = 0  # its stream's length after its last request


def check_session_name(name) -> str:
    """A session name that is a plain file name (no path, no `..`, no NUL), or RequestError."""
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name) or ".." in name:
        raise RequestError(
            "session must be 1-128 letters, digits, '_', '-' or '.', not starting with '.'",
            param="session",
        )
    return name


class Scheduler:
    """The thread that runs every request on one engine (see the module docstring).

    max_prompt_tokens: a longer prompt (or session turn) is refused with 400.
    sessions_dir: where idle sessions are saved; idle_s: a parked session older than this is
    saved and its row freed. prefill_tokens: the prompt tokens one prefill step feeds at most,
    counted as its rows times its tokens per row (a step feeds one row at least).
    prompt_cache: the stream states requests without a session start from
    (`jaxsink.prompt_cache`); states are kept at the end of each such request's prompt and
    reply, and at the end of a chat's system message.
    """

    def __init__(
        self,
        engine: Engine,
        sessions_dir: Path,
        max_prompt_tokens: int = 32768,
        idle_s: float = 300.0,
        prefill_tokens: int = 256,
        prompt_cache: PromptCache | None = None,
    ):
        self.engine = engine
        self.prompt_cache = PromptCache(0) if prompt_cache is None else prompt_cache
        self.prefill_tokens = prefill_tokens
        self.tokenizer = engine.model.tokenizer
        self.sessions_dir = Path(sessions_dir)
        self.max_prompt_tokens = max_prompt_tokens
        self.idle_s = idle_s
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.prefilling: list[Job] = []
        self.decoding: dict[int, Job] = {}
        self.sessions: dict[str, Session] = {}
        self.parked: dict[int, Session] = {}
        self.completed = 0
        self.sessions_saved = 0
        self.sessions_restored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxsink-scheduler", daemon=True)
        self.failure: BaseException | None = None

    # --- the caller's side ------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        self.incoming.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; parked sessions are saved first."""
        self._stop.set()
        self.incoming.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict:
        return {
            "rows": self.engine.batch,
            "rows_decoding": len(self.decoding),
            "rows_prefilling": len(self.prefilling),
            "rows_parked": len(self.parked),
            "queued": len(self.waiting) + self.incoming.qsize(),
            "sessions": len(self.sessions),
            "completed": self.completed,
            "sessions_saved": self.sessions_saved,
            "sessions_restored": self.sessions_restored,
            **{f"steps_{kind}": self.engine.steps[kind] for kind in ("prefill", "mixed", "decode")},
            **self.prompt_cache.stats(),
        }

    def session_info(self, name: str) -> dict | None:
        """Where session `name`'s stream is: its tokens seen, the cache slots they fill of the
        stream's capacity, and whether it is held in a row or saved on disk; None when this
        server has never seen it and it is not on disk."""
        check_session_name(name)
        session = self.sessions.get(name)
        if session is not None:
            tokens, where = session.tokens, "row" if session.row is not None else "disk"
            if session.busy:
                where = "busy"
        else:
            path = self._session_path(name)
            if not path.is_file():
                return None
            tokens, where = read_stream_info(path).index, "disk"
        capacity = self.engine.stream.capacity
        return {
            "tokens": tokens,
            "cache_slots": min(tokens, capacity),
            "cache_size": capacity,
            "where": where,
        }

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn(block=True)
        except BaseException as e:  # the server answers 503 from now on
            self.failure = e
            for job in self._all_jobs():
                job.emit(Event("error", error=RequestError(f"the server failed: {e}", 500)))
            raise
        finally:
            for session in list(self.parked.values()):
                self._park_to_disk(session)

    def _turn(self, block: bool) -> None:
        """One turn of the loop: new jobs taken (waiting for one if `block` and nothing else is
        to be done), cancelled ones dropped, idle sessions saved, rows given, then one prefill
        step or one decode block."""
        busy = bool(self.prefilling or self.decoding or self.waiting)
        self._take_new(block=block and not busy)
        self._drop_cancelled()
        self._save_idle_sessions()
        self._admit()
        if self.prefilling:
            self._prefill_step()  # with one decode step of the live rows
        elif self.decoding:
            self._decode_block()

    def _all_jobs(self) -> list[Job]:
        return [*self.waiting, *self.prefilling, *self.decoding.values()]

    def _any_live(self) -> bool:
        return bool(self.engine.live.any())

    def _take_new(self, block: bool) -> None:
        try:
            job = self.incoming.get(timeout=1.0) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while job is not None:
            self._accept(job)
            try:
                job = self.incoming.get_nowait()
            except queue.Empty:
                job = None

    def _accept(self, job: Job) -> None:
        """Tokenize a new job (a session's turn against its conversation) and queue it, or
        refuse it with an error event."""
        try:
            job.ids = self._prompt_ids(job)
        except (RequestError, StreamFileError, ValueError) as e:
            error = e if isinstance(e, RequestError) else RequestError(str(e))
            job.emit(Event("error", error=error))
            return
        if job.session is None and self.prompt_cache.max_bytes:
            job.marks = self._marks(job)
        job.emit(Event("accepted", prompt_tokens=len(job.ids)))
        self.waiting.append(job)

    def _marks(self, job: Job) -> list[int]:
        """Where a request without a session keeps its stream's state in the prompt cache:
        the end of a chat's system message (where the prompt begins with it as rendered
        alone: a new conversation with the same system prompt finds it) and the end of the
        prompt (the reply's end is kept when it is done)."""
        marks = [len(job.ids)]
        if job.messages and job.messages[0]["role"] == "system":
            system = Conversation(self.tokenizer, job.messages[0]["content"]).system_ids()
            if 0 < len(system) < len(job.ids) and job.ids[: len(system)] == system:
                marks.insert(0, len(system))
        return marks

    def _prompt_ids(self, job: Job) -> list[int]:
        tok = self.tokenizer
        session = self._session(job) if job.session is not None else None
        if job.messages is not None:
            if session is not None and session.conversation is None:
                raise RequestError(
                    f"session {job.session!r} holds a completions stream, not a chat",
                    param="session",
                )
            conversation = Conversation(tok) if session is None else session.conversation
            if session is not None:
                job.undo = conversation.state()
            ids = conversation.extend(job.messages)
        elif isinstance(job.prompt, str):
            continuing = session is not None and session.last_used > 0
            ids = tok.encode(job.prompt, add_special_tokens=not continuing)
        else:
            ids = list(job.prompt)
        try:
            ids = check_ids(ids, self.engine.model.cfg.vocab_size).tolist()
        except ConfigError as e:
            raise RequestError(str(e), param="prompt") from None
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(ids)} tokens, more than this server's limit of "
                f"{self.max_prompt_tokens}",
                param="prompt",
            )
        if session is not None:
            session.busy = True
        return ids

    def _session(self, job: Job) -> Session:
        """The job's session: known, saved on disk by an earlier run, or new."""
        name = job.session
        session = self.sessions.get(name)
        if session is None:
            path = self._session_path(name)
            chat = job.messages is not None
            conversation = Conversation(self.tokenizer) if chat else None
            session = Session(name, conversation)
            if path.is_file():  # saved by an earlier run of the server
                info = read_stream_info(path)
                extra = info.state.get("extra") or {}
                if "conversation" in extra:
                    session.conversation = Conversation(self.tokenizer).restore(
                        extra["conversation"]
                    )
                else:
                    session.conversation = None
                session.last_used = time.monotonic()
                session.tokens = info.index
            self.sessions[name] = session
        if session.busy:
            raise RequestError(
                f"session {name!r} is answering another request: wait for it", 409, "session"
            )
        return session

    def _session_path(self, name: str) -> Path:
        path = (self.sessions_dir / f"{name}.stream").resolve()
        if path.parent != self.sessions_dir.resolve():
            raise RequestError("session names a path outside the sessions folder", param="session")
        return path

    def _drop_cancelled(self) -> None:
        """Drop the jobs whose client left. A session's turn still waiting for a row is taken
        back from its conversation (its stream never saw it); one being prefilled is fed to its
        end, then ends with an empty reply (`_prompt_fed`), so that its conversation and its
        stream hold the same turn; one decoding ends with the reply so far."""
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            self._withdraw(job)
        for job in [j for j in self.prefilling if j.cancelled.is_set() and j.session is None]:
            self.prefilling.remove(job)
            self._finish(job, None)
        for row, job in list(self.decoding.items()):
            if job.cancelled.is_set():
                self.engine.halt(row)
                self._finish(job, None)

    def _withdraw(self, job: Job) -> None:
        """A job that never reached a row: its session free again, its turn taken back."""
        session = self.sessions.get(job.session)  # None without a session
        if session is not None:
            session.busy = False
            if job.undo is not None and session.conversation is not None:
                session.conversation.restore(job.undo)

    def _admit(self) -> None:
        """Give waiting jobs rows, oldest first, while rows can be had."""
        while self.waiting:
            job = self.waiting[0]
            session = self.sessions.get(job.session)  # None without a session
            if session is not None and session.row is not None:  # parked: go on in place
                row = session.row
                del self.parked[row]
                session.row = None
            elif not self._make_room():
                return
            elif session is not None and self._session_path(session.name).is_file():
                try:
                    saved = load_stream(self._session_path(session.name), self.engine.model)
                except StreamFileError as e:  # another model's session, or a damaged file
                    self.waiting.pop(0)
                    self._withdraw(job)
                    job.emit(Event("error", error=RequestError(str(e), 409, "session")))
                    continue
                row = self.engine.restore(saved.row, job.sampling)
                self.sessions_restored += 1
                job.ids = saved.pending + job.ids
            else:
                row = self._open(job)
            self.waiting.pop(0)
            job.row = row
            job.reply = RowText(self.tokenizer, self.engine.eos_ids, job.sampling.stop)
            if job.fed == len(job.ids):  # the whole prompt was cached
                self._prompt_fed(job)
            else:
                self.prefilling.append(job)

    def _open(self, job: Job) -> int:
        """A row for a request without a session: its stream restored from the prompt
        cache's longest prefix of its ids, with the key of its own seed (as `Engine.open`
        gives it), or a fresh one."""
        hit = self.prompt_cache.lookup(job.ids) if self.prompt_cache.max_bytes else None
        if hit is None:
            return self.engine.open(job.sampling)
        job.fed = job.cached = hit.tokens
        state = dataclasses.replace(hit.state, key=seed_key(job.sampling.seed))
        return self.engine.restore(state, job.sampling)

    def _keep(self, job: Job, ids: list[int]) -> None:
        """Keep the job's row, which has consumed exactly `ids`, in the prompt cache (only
        its use is noted when it is there)."""
        if not self.prompt_cache.touch(ids):
            self.prompt_cache.store(ids, self.engine.export(job.row, filled_only=True))

    def _make_room(self) -> bool:
        """Whether a row is free, after saving the least recently used idle parked session
        to disk if none was."""
        if self.engine.free_rows():
            return True
        idle = [s for s in self.parked.values() if not s.busy]
        if not idle:
            return False
        self._park_to_disk(min(idle, key=lambda s: s.last_used))
        return True

    def _park_to_disk(self, session: Session) -> None:
        """Save a parked session's stream under sessions_dir and free its row."""
        row = session.row
        extra = {}
        if session.conversation is not None:
            extra["conversation"] = session.conversation.state()
        saved = SavedStream(self.engine.export(row), settings={}, decoder={}, extra=extra)
        try:
            self.sessions_dir.mkdir(parents=True, exist_ok=True)
            save_stream(self._session_path(session.name), saved, self.engine.model)
        except (OSError, JaxsinkError) as e:  # the server goes on; this session is lost
            print(f"jaxsink serve: session {session.name!r} lost: {e}", file=sys.stderr)
            del self.sessions[session.name]
        else:
            self.sessions_saved += 1
        del self.parked[row]
        session.row = None
        self.engine.release(row)

    def _save_idle_sessions(self) -> None:
        now = time.monotonic()
        for session in list(self.parked.values()):
            if not session.busy and now - session.last_used > self.idle_s:
                self._park_to_disk(session)

    def _prefill_step(self) -> None:
        """One prefill step: the next chunk of each of the oldest prefilling jobs, as many as
        the step's token budget holds (first come, first served), with one decode step of the
        decoding rows (`Engine.step`); a job whose prompt is all fed starts decoding."""
        jobs, ends, longest = [], [], 0
        for job in self.prefilling:
            end = self._chunk_end(job)
            longest = max(longest, end - job.fed)
            length = next(n for n in token_buckets(self.engine.chunk) if n >= longest)
            if jobs and (len(jobs) + 1) * length > self.prefill_tokens:
                break
            jobs.append(job)
            ends.append(end)
        self.engine.step(
            {job.row: job.ids[job.fed : end] for job, end in zip(jobs, ends, strict=True)}
        )
        self._emit_decoded()
        for job, end in zip(jobs, ends, strict=True):
            job.fed = end
            if end in job.marks:
                self._keep(job, job.ids[:end])
            if job.fed == len(job.ids):
                self.prefilling.remove(job)
                self._prompt_fed(job)

    def warm(self) -> Scheduler:
        """Compile and run once every bucket its steps use (`Engine.warm`): the decode buckets,
        and prefill up to the most rows a step of `prefill_tokens` holds, at half a chunk
        each."""
        self.engine.warm(self.prefill_tokens // token_buckets(self.engine.chunk)[0])
        return self

    def _chunk_end(self, job: Job) -> int:
        """Where the job's next chunk ends: a chunk on, at the prompt's end, or at the next
        point where its state is kept."""
        end = min(job.fed + self.engine.chunk, len(job.ids))
        return min([m for m in job.marks if job.fed < m < end] + [end])

    def _prompt_fed(self, job: Job) -> None:
        """A job's prompt is fed: its row decodes from the next block on, or, when its client
        left meanwhile (a session's turn), it ends with an empty reply."""
        if job.cancelled.is_set():
            self._finish(job, None)
            return
        self.engine.arm(job.row, job.sampling, logprobs=job.logprobs > 0)
        self.decoding[job.row] = job

    def _decode_block(self) -> None:
        # A row that has not given its first token yet gets it after one step, not a block.
        fresh = any(not job.reply.tokens for job in self.decoding.values())
        self.engine.decode(limit=1 if fresh else None)
        self._emit_decoded()

    def _emit_decoded(self) -> None:
        """Emit what the last decode step drew for each decoding job; finish the jobs that
        stopped."""
        engine = self.engine
        for row, job in list(self.decoding.items()):
            out = engine.last[row]
            if out.tokens:
                self._emit_tokens(job, out)
            if job.row is None:  # a stop string ended it
                continue
            if not engine.live[row]:
                self._finish(job, "stop" if job.reply.reason == "eos" else "length")

    def _emit_tokens(self, job: Job, out) -> None:
        """Detokenize a block's tokens, cut at a stop string, and emit them."""
        piece = job.reply.push(out.tokens)
        job.emit(Event("text", piece, out.tokens, out.logprobs, out.top))
        if job.reply.stopped:
            self.engine.halt(job.row)
            self._finish(job, "stop")

    def _keep_reply(self, job: Job) -> None:
        """Keep a finished request's stream at the end of its reply: its prompt and every
        token it generated but a final EOS (which never enters the stream)."""
        consumed = job.ids + job.reply.tokens
        if consumed[-1] in self.engine.eos_ids:
            consumed = consumed[:-1]
        if self.engine.positions()[job.row] == len(consumed):
            self._keep(job, consumed)

    def _finish(self, job: Job, reason: str | None) -> None:
        """End a job: the rest of its text, then "done" (none when cancelled: reason None),
        and its row parked (a session) or freed."""
        row = job.row
        self.decoding.pop(row, None)
        if reason is not None:
            rest = job.reply.finish()  # text held back for a character not yet complete
            if rest:
                job.emit(Event("text", rest))
        session = self.sessions.get(job.session)  # None without a session
        if session is None and row is not None and reason is not None and job.marks:
            self._keep_reply(job)
        if session is not None:
            if session.conversation is not None:
                session.conversation.assistant_reply(job.reply.text if job.reply else "")
            session.busy, session.last_used = False, time.monotonic()
            if row is not None:
                session.tokens = self.engine.positions()[row]
                session.row = row
                self.parked[row] = session
        elif row is not None:
            self.engine.release(row)
        job.row = None
        if reason is not None:
            self.completed += 1
            job.emit(
                Event(
                    "done",
                    finish_reason=reason,
                    completion_tokens=len(job.reply.tokens),
                    cached_tokens=job.cached,
                )
            )
