"""A chat as one endless stream: each turn feeds only what is new.

The stream has consumed the rendered conversation so far: every turn's text as the model's chat
template renders it, and each reply's tokens as they were generated. A new user message renders
the whole conversation again (with the generation prompt) and feeds only what follows the text
already consumed; for the chat templates that render a conversation as the concatenation of its
messages (ChatML, Llama 3, Mistral, Gemma, ...) that is exactly the closing of the last reply,
the new message and the assistant prompt. A template that rewrites earlier turns cannot be
continued that way; its new message is then rendered on its own.
"""

from __future__ import annotations

from jaxsink.tokenizer import Tokenizer


class Conversation:
    """The messages of one chat and the text its stream has consumed.

    system: an optional system prompt, the first message.
    """

    def __init__(self, tokenizer: Tokenizer, system: str | None = None):
        self.tokenizer = tokenizer
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.consumed = ""  # the rendered text the stream holds, replies included

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first["content"] if first and first["role"] == "system" else None

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def system_ids(self) -> list[int]:
        """The system prompt as the template renders it alone: the stream's first tokens, fed
        before the first turn (so `--keep-system` can keep exactly these as the sinks)."""
        if self.consumed or self.system is None:
            raise ValueError("the system prompt is fed once, before the first turn")
        text = self._render(self.messages[:1], add_generation_prompt=False)
        self.consumed = text
        return self._ids(text)

    def user_turn(self, content: str) -> list[int]:
        """Append a user message: the token ids to feed, up to and including the assistant
        prompt the reply follows."""
        return self.extend([{"role": "user", "content": content}])

    def extend(self, messages: list[dict]) -> list[int]:
        """Append messages ({"role", "content"} each; a whole conversation to start one): the
        token ids to feed, up to and including the assistant prompt the reply follows."""
        added = [{"role": m["role"], "content": m["content"]} for m in messages]
        self.messages += added
        full = self._render(self.messages, add_generation_prompt=True)
        if full.startswith(self.consumed):
            new = full[len(self.consumed) :]
        else:  # a template that rewrites earlier turns: these messages rendered on their own
            new = self._render(added, add_generation_prompt=True)
        self.consumed += new
        return self._ids(new)

    def assistant_reply(self, text: str) -> None:
        """Record the reply the stream generated (its text, without the end-of-turn token)."""
        self.messages.append({"role": "assistant", "content": text})
        self.consumed += text

    def state(self) -> dict:
        """JSON that `restore` continues from (kept with a saved stream; a copy, which later
        turns leave as it is)."""
        return {"messages": list(self.messages), "consumed": self.consumed}

    def restore(self, state: dict) -> Conversation:
        messages = state.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("a saved conversation's messages are not a list of messages")
        self.messages = [{"role": str(m.get("role")), "content": m["content"]} for m in messages]
        self.consumed = str(state.get("consumed", ""))
        return self
