"""The one per-row text loop every face runs over a row's decode blocks (`jaxsink generate`,
`jaxsink chat`, the server's scheduler): the tokens detokenized as they come, the text cut at
the first stop string, and how the row ended."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxsink.tokenizer import IncrementalDecoder, Tokenizer


def cut_at_stop(text: str, piece: str, stops: Iterable[str]) -> tuple[str, int | None]:
    """`piece` appended to `text` and cut at the first of `stops` (a stop string may begin in
    `text`): (the part of `piece` to emit, where the stop string begins in `text + piece`, or
    None when there is none)."""
    whole = text + piece
    hits = [whole.find(s, max(0, len(text) - len(s) + 1)) for s in stops]
    cut = min((h for h in hits if h >= 0), default=None)
    if cut is None:
        return piece, None
    return whole[len(text) : max(cut, len(text))], cut


class RowText:
    """One row's reply as text.

    tokenizer: the model's; eos_ids: the engine's EOS ids; stops: strings that end the text
    (found across block boundaries); decoder: an `IncrementalDecoder` to go on from (a resumed
    stream's), else a new one that skips special tokens.

    `tokens` holds every token pushed, `text` the text so far (cut exactly at a stop string),
    and `reason` how the reply ended: "stop_string" (the row should be halted), "eos" (its last
    token is an EOS id), or None (still going, or out of tokens).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_ids: Iterable[int],
        stops: Sequence[str] = (),
        decoder: IncrementalDecoder | None = None,
    ):
        self.eos_ids = frozenset(eos_ids)
        self.stops = tuple(s for s in stops if s)
        self.decoder = decoder or IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.tokens: list[int] = []
        self.text = ""
        self.reason: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the text."""
        return self.reason == "stop_string"

    def push(self, tokens: Sequence[int]) -> str:
        """A decode block's tokens: the text they add (possibly empty), cut at a stop string."""
        self.tokens += tokens
        piece = self._add(self.decoder.push(tokens))
        if not self.stopped and tokens and tokens[-1] in self.eos_ids:
            self.reason = "eos"
        return piece

    def finish(self) -> str:
        """The text held back at the end for a character not yet complete (none after a stop
        string)."""
        return "" if self.stopped else self._add(self.decoder.flush())

    def _add(self, piece: str) -> str:
        emit, cut = cut_at_stop(self.text, piece, self.stops)
        self.text = (self.text + piece)[:cut]
        if cut is not None:
            self.reason = "stop_string"
        return emit
