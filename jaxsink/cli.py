"""The `jaxsink` command: `jaxsink generate ...` (and the other subcommands as they land)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxsink.config import JaxsinkError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="jaxsink checkpoint, HF folder, .gguf or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="run-time dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sinks", type=int, default=4, help="attention sink tokens kept (default 4)")
    p.add_argument("--window", type=int, default=1020, help="recent tokens kept (default 1020)")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk length C (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxsink", description="Endless LLM streams with attention sinks, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", choices=["sink", "window", "dense"], default="sink")
    _add_stream_args(g)
    g.add_argument("--block", type=int, default=16, help="decode steps per device loop (default 16)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="after the text, print one JSON line of figures")
    return parser


def default_dtype() -> str:
    """float32 on CPU (the reference dtype), bfloat16 on accelerators."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def cmd_generate(args) -> int:
    import jax

    from jaxsink.config import StreamConfig
    from jaxsink.generate import Generation, Sampling
    from jaxsink.loading import load

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise JaxsinkError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise JaxsinkError("empty prompt: give some text with --prompt")
    StreamConfig.for_mode(args.mode, args.sinks, args.window, dense_capacity=1)  # fail before loading
    model = load(args.model, dtype=args.dtype or default_dtype())
    gen = Generation(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        mode=args.mode,
        sinks=args.sinks,
        window=args.window,
        chunk=args.chunk,
        block=args.block,
        stop=args.stop,
        chat=args.chat,
    )
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.json:
        report = gen.stats.as_dict() | {
            "model": str(model.path),
            "dtype": str(model.dtype),
            "device": str(jax.devices()[0].device_kind),
            "mode": gen.stream.mode,
            "sinks": gen.stream.sinks,
            "window": gen.stream.window,
            "chunk": args.chunk,
            "token_ids": gen.token_ids,
        }
        sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


COMMANDS = {"generate": cmd_generate}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (JaxsinkError, FileNotFoundError) as e:
        print(f"jaxsink {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
