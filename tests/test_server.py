"""`jaxsink serve` under real HTTP clients (httpx, openai), on a tiny checkpoint in a real server
process: concurrent streaming requests with more clients than rows, each reply equal to the same
request run alone; sessions that feed only their new message and survive being saved to disk; a
client that disconnects frees its row; bad requests get 4xx JSON errors and the server goes on.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import pytest

import jaxsink
from jaxsink.generate import Sampling
from tests.support.served import STREAM, Server, metric_values
from tests.support.tiny import chat_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    s = Server(tiny_dir, tmp_path_factory.mktemp("home"), "--max-batch", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return jaxsink.load(tiny_dir)


def alone(model, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0) -> str:
    gen = jaxsink.generate(
        model,
        prompt,
        max_new_tokens=max_tokens,
        sampling=Sampling(temperature, 0, top_p),
        seed=seed,
        **STREAM,
    )
    return "".join(gen)


REQUESTS = [  # more than the server's two rows, with mixed settings and lengths
    {"prompt": "t5 t9 t11", "max_tokens": 12, "temperature": 0},
    {"prompt": " ".join(f"t{i}" for i in range(10, 40)), "max_tokens": 9, "temperature": 0},
    {"prompt": "t7 t8", "max_tokens": 15, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"prompt": "t20 t21 t22 t23", "max_tokens": 7, "temperature": 1.2, "seed": 11},
    {"prompt": "t50", "max_tokens": 10, "temperature": 0},
]


def streamed_text(server: Server, body: dict) -> str:
    """The text of a streamed completion (its events checked: SSE ending in [DONE])."""
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body | {"stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_concurrent_streams_equal_each_request_alone(server, tiny):
    """Five concurrent clients, streamed and not, against two rows: every text equals the
    same request run alone with `jaxsink.generate` (greedy and sampled with a seed)."""
    want = [
        alone(
            tiny,
            r["prompt"],
            r["max_tokens"],
            r["temperature"],
            r.get("top_p", 1.0),
            r.get("seed", 0),
        )
        for r in REQUESTS
    ]

    def ask(i):
        if i % 2:
            return streamed_text(server, REQUESTS[i])
        r = server.post("/v1/completions", REQUESTS[i])
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        got = list(pool.map(ask, range(len(REQUESTS))))
    assert got == want
    assert all(got)
    h = server.health()
    assert h["rows_decoding"] == h["rows_prefilling"] == h["queued"] == 0
    # prompts were fed beside a decoding row in one pass (one live row of two is the whole
    # batch's bucket), and in plain prefill steps while no row decoded
    assert h["steps_mixed"] > 0 and h["steps_prefill"] > 0 and h["steps_decode"] > 0


def test_streamed_equals_unstreamed_with_logprobs(server):
    body = {"prompt": "t5 t6 t7", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = server.post("/v1/completions", body).json()
    text = streamed_text(server, body)
    choice = whole["choices"][0]
    assert text == choice["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    # greedy: each token is its step's most likely one, and its log-probability the top one
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        best = max(top, key=top.get)
        assert best == token and top[best] == pytest.approx(logprob) and logprob <= 0
    usage = {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert whole["usage"] == usage | {"prompt_tokens_details": {"cached_tokens": 0}}
    # the streamed request ran the same prompt again: its state at the prompt's end was kept
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"] == [] and last["usage"] == usage | {
        "prompt_tokens_details": {"cached_tokens": 3}
    }


def test_a_resent_conversation_starts_from_its_cached_stream(server, tiny):
    """The openai client resending a whole chat (no session): each later turn reports the
    tokens its cached history spared (`stream_options.include_usage`), and every reply equals
    the conversation run alone."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "system", "content": "t60 t61 t62 t63 t64"}]
    for turn, question in enumerate(["t30 t31", "t32", "t33 t34"]):
        messages.append({"role": "user", "content": question})
        parts = list(
            client.chat.completions.create(
                model="ckpt",
                messages=messages,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        reply = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        ids = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(messages), False)
        assert reply == alone(tiny, ids, 5)
        usage = parts[-1].usage
        assert usage.prompt_tokens == len(ids)
        cached = usage.prompt_tokens_details.cached_tokens
        assert (cached == 0) if turn == 0 else (len(ids) - 8 <= cached < len(ids))
        messages.append({"role": "assistant", "content": reply})


def test_openai_client_chat_and_completions(server, tiny):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["ckpt"]
    done = client.completions.create(model="ckpt", prompt="t9 t8", max_tokens=6, temperature=0)
    assert done.choices[0].text == alone(tiny, "t9 t8", 6)
    messages = [{"role": "user", "content": "t30 t31"}]
    parts = client.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    whole = client.chat.completions.create(
        model="ckpt", messages=messages, max_tokens=6, temperature=0
    )
    assert streamed == whole.choices[0].message.content
    ids = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(messages), False)
    assert whole.choices[0].message.content == alone(tiny, ids, 6)


def test_a_session_feeds_only_its_new_message_and_survives_disk(tiny_dir, tmp_path, tiny):
    """Turns of a session continue one stream: its second turn's usage counts only the new
    message, and its reply equals the whole conversation's stream run in one go. With one row
    and another client taking it, the session is saved to disk and restored bit for bit."""
    server = Server(tiny_dir, tmp_path, "--max-batch", "1")
    try:
        turns = ["t40 t41 t42", "t43 t44"]
        replies = []
        for i, turn in enumerate(turns):
            body = {"messages": [{"role": "user", "content": turn}], "max_tokens": 5}
            r = server.post("/v1/chat/completions", body | {"temperature": 0, "session": "a.b"})
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
            if i == 0:  # another client takes the only row: the session goes to disk
                assert server.post("/v1/completions", {"prompt": "t1", "max_tokens": 3}).is_success
                assert (tmp_path / "sessions" / "a.b.stream").is_file()
        usage = r.json()["usage"]
        second = tiny.tokenizer.encode("t4 t3 t43 t44 t4 t5", add_special_tokens=False)
        assert usage["prompt_tokens"] == len(second)
    finally:
        server.stop()
    # a restarted server finds the session where the last one left it (saved at shutdown)
    server = Server(tiny_dir, tmp_path, "--max-batch", "1")
    try:
        body = {"messages": [{"role": "user", "content": "t45"}], "max_tokens": 2, "session": "a.b"}
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(["t4", "t3", "t45", "t4", "t5"])
    finally:
        server.stop()
    # the same stream in one go: first turn, first reply's tokens, second turn
    first = tiny.tokenizer.encode("t3 t40 t41 t42 t4 t5", add_special_tokens=False)
    gen = jaxsink.generate(tiny, first, max_new_tokens=5, **STREAM)
    assert "".join(gen) == replies[0]
    ids = first + gen.token_ids
    if gen.stats.stop_reason == "eos":
        ids = ids[:-1]  # the EOS is not fed; the template's own end-of-turn follows
    assert "".join(jaxsink.generate(tiny, ids + second, max_new_tokens=5, **STREAM)) == replies[1]


def test_a_client_that_leaves_frees_its_row(server):
    body = {"prompt": "t3 t4", "max_tokens": 4000, "temperature": 0.7, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.health()["rows_decoding"] == 1
    deadline = time.monotonic() + 30
    while server.health()["rows_decoding"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health()["rows_decoding"] == 0
    assert server.post("/v1/completions", {"prompt": "t3", "max_tokens": 2}).is_success


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "t1", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "t1", "max_tokens": 10**6}, 400, "max_tokens"),
        ({"prompt": "t1", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "t1", "top_p": 0}, 400, "top_p"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ({"prompt": "t1", "stop": [1]}, 400, "stop"),
        ({"prompt": "t1", "n": 2}, 400, "n"),
        ({"prompt": "t1", "logprobs": 9}, 400, "logprobs"),
        ({"prompt": "t1", "session": "../escape"}, 400, "session"),
        ({"prompt": "t1", "session": "/etc/passwd"}, 400, "session"),
        ({"prompt": "t1", "session": "a\x00b"}, 400, "session"),
        ({"prompt": "t1 " * 300}, 400, "prompt"),  # over --max-prompt-tokens
        ({"prompt": "x" * 5000}, 413, None),  # over --max-body-bytes
    ],
)
def test_bad_requests_get_json_errors(limited, body, status, param):
    r = limited.post("/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param
    assert limited.post("/v1/completions", {"prompt": "t1", "max_tokens": 2}).is_success


@pytest.fixture(scope="module")
def limited(tiny_dir, tmp_path_factory):
    flags = ["--max-batch", "1", "--max-tokens", "100", "--max-prompt-tokens", "200"]
    flags += ["--max-body-bytes", "4000", "--max-connections", "8"]
    s = Server(tiny_dir, tmp_path_factory.mktemp("limited"), *flags)
    yield s
    s.stop()


def test_malformed_http_gets_json_errors(limited):
    r = httpx.post(limited.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(limited.url + "/v1/chat/completions", json={"messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(limited.url + "/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(limited.url + "/v1/completions", timeout=10).status_code == 405
    limited.sessions.mkdir(exist_ok=True)
    (limited.sessions / "damaged.stream").write_bytes(b"\x10" * 100)
    r = limited.post("/v1/completions", {"prompt": "t1", "session": "damaged"})
    assert r.status_code == 400 and "damaged.stream" in r.json()["error"]["message"]
    assert limited.post("/v1/completions", {"prompt": "t1", "max_tokens": 2}).is_success


def test_connections_beyond_the_limit_get_503(limited):
    """Idle connections held open up to the limit: the next request gets 503. A flood of 200
    concurrent requests: each is answered (200 or 503), none is dropped, and the server goes
    on serving."""
    held = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(8)]
    time.sleep(0.3)
    refused = httpx.get(limited.url + "/health", timeout=10)
    for s in held:
        s.close()
    time.sleep(0.3)
    assert refused.status_code == 503

    def ask(i):
        body = {"prompt": f"t{i % 90 + 3}", "max_tokens": 2}
        return httpx.post(limited.url + "/v1/completions", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(ask, range(200)))
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert httpx.get(limited.url + "/health", timeout=10).status_code == 200
    assert limited.post("/v1/completions", {"prompt": "t3", "max_tokens": 2}).is_success


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "TAKEN"], "cannot listen on"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--window", "0"], "window must be >= 1"),
        (["--port", "70000"], "--port must be in"),
        (["--session-idle-s", "0"], "--session-idle-s must be > 0"),
        (["--api-key", ""], "--api-key (or JAXSINK_API_KEY) must be non-empty"),
        (["--api-key", "a b"], "--api-key (or JAXSINK_API_KEY) must be non-empty"),
    ],
)
def test_serve_bad_flags_exit_2(capsys, tiny_dir, tmp_path, flags, message):
    from jaxsink import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [str(taken.getsockname()[1]) if f == "TAKEN" else f for f in flags]
        sessions = ["--sessions-dir", str(tmp_path / "sessions")]
        code = cli.main(["serve", "--model", str(tiny_dir), *sessions, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_metrics_parse_and_count_each_request(server):
    """GET /metrics is Prometheus text; a completion raises the token counters by its usage,
    the request counter of its endpoint and status, and the time-to-first-token histogram."""
    before = metric_values(httpx.get(server.url + "/metrics", timeout=10).text)
    r = server.post("/v1/completions", {"prompt": "t11 t12 t13", "max_tokens": 5})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert server.post("/v1/completions", {"prompt": "t1", "n": 3}).status_code == 400
    page = httpx.get(server.url + "/metrics", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    after = metric_values(page.text)

    def rise(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert rise("jaxsink_completion_tokens_total") == usage["completion_tokens"] == 5
    assert rise("jaxsink_prompt_tokens_total") == usage["prompt_tokens"]
    assert rise("jaxsink_cached_tokens_total") == usage["prompt_tokens_details"]["cached_tokens"]
    assert rise("jaxsink_requests_total", endpoint="/v1/completions", status="200") == 1
    assert rise("jaxsink_requests_total", endpoint="/v1/completions", status="400") == 1
    assert rise("jaxsink_time_to_first_token_seconds_count") == 1
    assert after[("jaxsink_decode_tokens_per_second", ())] > 0
    for gauge in ("rows_live", "rows_parked", "rows_prefilling", "queue_length"):
        assert after[(f"jaxsink_{gauge}", ())] >= 0
    for name in ("prompt_cache_entries", "prompt_cache_bytes", "prompt_cache_hits_total"):
        assert (f"jaxsink_{name}", ()) in after
    assert ("jaxsink_sessions_saved_total", ()) in after
    assert ("jaxsink_sessions_restored_total", ()) in after


USER = [{"role": "user", "content": "t5"}]


@pytest.mark.parametrize(
    "field, value",
    [
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("logit_bias", {"5": 100}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("best_of", 2),
        ("echo", True),
        ("suffix", " t9"),
    ],
)
def test_what_jaxsink_does_not_do_is_refused(server, field, value):
    """A field that would change what the reply means, which jaxsink does not implement, gets
    400 naming it, on chat and completions alike (never a reply that ignored it)."""
    bodies = {"/v1/chat/completions": {"messages": USER}, "/v1/completions": {"prompt": "t5"}}
    for path, body in bodies.items():
        r = server.post(path, body | {field: value, "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"]


def test_fields_that_change_nothing_are_accepted(server):
    neutral = {
        "model": "anything",
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "logit_bias": {},
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
    }
    plain = {"messages": USER, "max_tokens": 4, "temperature": 0}
    want = server.post("/v1/chat/completions", plain).json()["choices"][0]["message"]
    r = server.post("/v1/chat/completions", plain | neutral)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == want


def test_the_api_key_guards_every_api_endpoint(tiny_dir, tmp_path, monkeypatch):
    """With JAXSINK_API_KEY set: every /v1/... endpoint and /metrics answer 401 with an
    OpenAI-style error without the key or with a wrong one, and as usual with it; /health and
    the chat page stay open; the key appears in nothing the server prints."""
    key = "sk-test-7f3a9c"
    monkeypatch.setenv("JAXSINK_API_KEY", key)
    keyed = Server(tiny_dir, tmp_path, "--max-batch", "1")
    try:
        requests = [
            ("POST", "/v1/completions", {"prompt": "t5", "max_tokens": 2}, 200),
            ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2}, 200),
            ("GET", "/v1/models", None, 200),
            ("GET", "/v1/sessions/nobody", None, 404),
            ("GET", "/v1/nothing", None, 404),
            ("GET", "/metrics", None, 200),
        ]
        wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": key}]
        wrong += [{"Authorization": f"Bearer {key}x"}, {"Authorization": "Basic " + key}]
        for method, path, body, status in requests:
            for headers in wrong:
                r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=30)
                assert r.status_code == 401, (path, headers)
                error = r.json()["error"]
                assert error["code"] == "invalid_api_key" and key not in r.text
            right = {"Authorization": f"Bearer {key}"}
            r = httpx.request(method, keyed.url + path, json=body, headers=right, timeout=60)
            assert r.status_code == status, (path, r.text)
        for path in ("/health", "/", "/web/app.js"):
            assert httpx.get(keyed.url + path, timeout=10).status_code == 200
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key)
        assert [m.id for m in client.models.list().data] == ["ckpt"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong").models.list()
    finally:
        err = keyed.stop()
    assert "API key required" in err and key not in err
