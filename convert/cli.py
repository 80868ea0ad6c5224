"""`jaxsink-convert SRC OUT [--dtype float32|bfloat16] [--quantize keep|int8|int4] [--overwrite]`."""

from __future__ import annotations

import argparse
import sys

from jaxsink.checkpoint import CheckpointError
from jaxsink.cli import OneLineParser, one_line
from jaxsink.config import DTYPES, ConfigError

from . import QUANTIZE, ConvertError, convert

PROG = "jaxsink-convert"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of jaxsink-convert."""
    parser = OneLineParser(
        prog=PROG,
        description="Convert a Hugging Face model (folder or hub id) or a GGUF file into a "
        "jaxsink checkpoint folder.",
    )
    parser.add_argument("src", help="Hugging Face folder, .gguf file, or hub id org/name")
    parser.add_argument("out", help="output checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="keep: a .gguf's Q8_0, Q4_0 and Q4_1 weights stay quantized as they are; "
        "int8 / int4: any source's matrices are quantized (int8 per output channel, int4 in "
        "groups of 32), scales in --dtype",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the exit status (2 with one `error:` line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        out = convert(
            args.src,
            args.out,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.quiet,
            quantize=args.quantize,
        )
    except (ConvertError, ConfigError, CheckpointError, OSError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
