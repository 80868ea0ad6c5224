"""Text <-> token ids for a checkpoint, with the public `tokenizers` API and jinja2 chat templates.

No transformers import at run time: a checkpoint carries `tokenizer.json`, and optionally
`tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`) and
`chat_template.jinja`. A checkpoint converted from a source without any tokenizer has none of
these: it serves token ids only, and its `Tokenizer` refuses text with a CheckpointError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxsink.files import CheckpointError, read_json_object


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def no_tokenizer_message(path: Path) -> str:
    """What to do with a checkpoint that has no tokenizer, in one line."""
    return (
        f"{path} has no tokenizer, so it takes token ids only (jaxsink ppl --tokens); for text, "
        f"copy tokenizer.json and tokenizer_config.json from the model's source into {path}, "
        "or put its tokenizer.model next to the source's weights and convert again"
    )


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, incremental `decode`, chat template, EOS ids.

    Without `tokenizer.json` in the checkpoint it still loads (EOS ids then come from
    `eos_token_ids` alone, `vocab_size` is None) and every text method raises CheckpointError.
    """

    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        tok_file = self.path / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
        except Exception as e:  # tokenizers raises its own exception type for any bad file
            raise CheckpointError(
                f"{tok_file} is not a valid tokenizer.json ({' '.join(str(e).split())[:200]}): "
                "copy it again from the model's source, or convert the model again"
            ) from None
        cfg_file = self.path / "tokenizer_config.json"
        self.config = (
            read_json_object(cfg_file, advice="copy it again") if cfg_file.is_file() else {}
        )
        template_file = self.path / "chat_template.jinja"
        self.chat_template = (
            template_file.read_text()
            if template_file.is_file()
            else self.config.get("chat_template")
        )
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self._token_id(self.bos_token)
        eos = set(eos_token_ids)
        if self._token_id(self.eos_token) is not None:
            eos.add(self._token_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))
        self.vocab_size = (
            None if self._tok is None else self._tok.get_vocab_size(with_added_tokens=True)
        )

    def _token_id(self, token: str | None) -> int | None:
        """The id of a special token named in tokenizer_config.json, if the vocabulary has it."""
        return self._tok.token_to_id(token) if token and self._tok is not None else None

    def _backend(self):
        """The `tokenizers.Tokenizer`; CheckpointError when the checkpoint has none."""
        if self._tok is None:
            raise CheckpointError(no_tokenizer_message(self.path))
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. BOS is added when the tokenizer's own rules say so."""
        ids = self._backend().encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.config.get("add_bos_token")
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend().decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role", "content"}]) with the checkpoint's jinja2 chat template."""
        self._backend()  # no tokenizer says more than "no chat template"
        if not self.chat_template:
            raise CheckpointError("this model has no chat template (run without --chat)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces without re-decoding everything each time.

    Holds back text that ends in an incomplete UTF-8 sequence (shown as U+FFFD) until the next
    token completes it, as text-generation servers do.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were decoded as context for the next piece
        self._read = 0

    def push(self, new_ids: Sequence[int]) -> str:
        """Add ids; return the text they complete (possibly empty)."""
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self.ids[self._prefix :], self._skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(prefix_text) :]

    def state(self) -> dict:
        """What the next pieces depend on (JSON): the ids from the last piece's context on."""
        return {"ids": self.ids[self._prefix :], "read": self._read - self._prefix}

    def restore(self, state: dict) -> IncrementalDecoder:
        """Continue from `state()` of another decoder (of the same tokenizer)."""
        ids = [int(i) for i in state.get("ids", [])]
        read = int(state.get("read", 0))
        if not 0 <= read <= len(ids):
            raise ValueError(f"a detokenizer state reads {read} of {len(ids)} ids")
        self.ids, self._prefix, self._read = ids, 0, read
        return self

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence at the very end)."""
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self.ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self.ids)
        return full[len(prefix_text) :]
