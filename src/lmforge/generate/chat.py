"""A conversation with a model, turn by turn: what `lmforge chat` runs (the server's chat endpoint renders and stops
each request's messages the same way).

    each turn: the user's text joins the messages -> the messages through the model's chat template (the one it was
    fine-tuned with, lmforge's default <|role|> turns otherwise), the assistant's header last -> the reply is
    streamed, ending at an end token, a stop string, the budget, or the next user turn's header (a model that goes
    on past its reply would write it next) -> the reply joins the messages.

When the conversation and the reply's budget no longer fit the context, the oldest turns (after a system prompt)
are left out of what the model reads; the session keeps them all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

from lmforge.errors import ConfigError
from lmforge.generate.api import TextGenerator, prompt_ids, stream
from lmforge.generate.config import GenerateConfig


class ChatSession:
    """The messages of one conversation with `generator`, and the reply to each new user turn (`say`)."""

    def __init__(self, generator: TextGenerator, config: Optional[GenerateConfig] = None,
                 system: Optional[str] = None) -> None:
        config = config or GenerateConfig()
        if config.num_return_sequences != 1 or config.num_beams != 1:
            raise ConfigError("a chat streams one reply per turn: set num_return_sequences=1 and num_beams=1")
        self.generator, self.system = generator, system
        self.config = replace(config, stop_strings=list(config.stop_strings or []) + [generator.chat_stop()])
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def context(self) -> list[dict]:
        """The messages the model reads for the next reply: all of them, or, when they and the reply's budget do
        not fit block_size, the system prompt and the newest turns that do (the last user turn at least)."""
        block = self.generator.model.config.block_size
        head = self.messages[:1] if self.system else []
        turns = self.messages[len(head):]
        starts = [i for i, turn in enumerate(turns) if turn["role"] == "user"]  # whole exchanges, oldest first
        for start in starts:
            chosen = head + turns[start:]
            ids = prompt_ids(self.generator.tokenizer, self.generator.render_chat(chosen))
            if len(ids) + self.config.new_tokens(len(ids)) <= block or start == starts[-1]:
                return chosen
        return head + turns

    def say(self, text: str) -> Iterator[str]:
        """Add the user's `text` and yield the reply's text pieces as they are generated; the reply (whatever was
        generated, if the reader stops early) joins the messages."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.generator.render_chat(self.context())
        reply = ""
        try:
            for piece in stream(self.generator.model, self.generator.tokenizer, prompt, self.config,
                                self.generator.assistant_model):
                reply += piece
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": reply})
