"""The transformers (PyTorch) baseline, in a child process that never imports JAX.

`bench.py --hf-worker` runs `serve`: timing requests, one JSON object per line on stdin, each
answered by one on stdout. `HFBaseline` starts that child and asks it. PyTorch and XLA then
never compete for the cores with their thread pools.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from measure import proc_cpu_seconds

BENCH = Path(__file__).resolve().parent.parent / "bench.py"


def serve(hf_model: str | None, jaxsink_model: str, threads: int) -> None:
    """Serve timing requests, one JSON object per line on stdin -> one per line on stdout."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    torch.set_num_threads(threads)
    if hf_model:
        model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).eval()
        source = hf_model
    else:
        from torch_reference import hf_llama_from_checkpoint

        try:
            model = hf_llama_from_checkpoint(jaxsink_model)
        except ValueError as e:
            raise SystemExit(f"{e} (pass --hf-model)") from None
        source = f"rebuilt from {jaxsink_model}"

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    reply(
        {
            "ready": True,
            "source": source,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        ids = torch.tensor([req["ids"]], dtype=torch.long)
        n = req.get("new", 0)
        max_s = req.get("max_s", 1e9)  # runs stop early past this (steps done are reported)
        with torch.inference_mode():
            if cmd == "parity":
                logits = model(ids).logits[0, -1].float().numpy()
                reply({"logits": base64.b64encode(logits.astype(np.float32).tobytes()).decode()})
            elif cmd == "loop":
                t0 = time.perf_counter()
                out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
                cache = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                tokens = [int(tok)]
                for _ in range(n):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(tok))
                    if time.perf_counter() - t1 > max_s:
                        break
                t2 = time.perf_counter()
                reply(
                    {
                        "prefill_s": t1 - t0,
                        "decode_s": t2 - t1,
                        "steps": len(tokens) - 1,
                        "tokens": tokens,
                    }
                )
            elif cmd == "generate":
                mask = torch.ones_like(ids)
                t0 = time.perf_counter()
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    max_time=max_s,
                )
                reply({"s": time.perf_counter() - t0, "tokens": out[0, ids.shape[1] :].tolist()})
            else:
                reply({"error": f"unknown command {cmd!r}"})


class HFBaseline:
    """Handle on the `--hf-worker` child process."""

    def __init__(self, hf_model: str | None, jaxsink_model: str, threads: int):
        cmd = [sys.executable, str(BENCH), "--hf-worker", "--threads", str(threads)]
        cmd += ["--model", jaxsink_model] + (["--hf-model", hf_model] if hf_model else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict | None = None

    def wait_ready(self) -> dict:
        """The worker's hello (versions, threads, where its model came from), once it is up."""
        if self.info is None:
            self.info = self._read()
        return self.info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the transformers worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str, ids, new: int = 0, max_s: float = 1e9) -> dict:
        """One request ("parity", "loop" or "generate" over prompt `ids`) and its answer."""
        self.wait_ready()
        req = {"cmd": cmd, "ids": [int(i) for i in ids], "new": new, "max_s": max_s}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def cpu_seconds(self) -> float:
        """The worker's CPU seconds so far (a `measure.LoadMeter` helper)."""
        return proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        """Ask the worker to quit; kill it if it has not within 30 s."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
