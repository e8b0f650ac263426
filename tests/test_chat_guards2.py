"""ChatSession.context at the edge of the context (generate/chat.py): a conversation whose tokens and reply budget
fill block_size exactly is read whole; one token more and the oldest exchange makes room."""

from __future__ import annotations

import pytest

from lmforge.generate import GenerateConfig, load, prompt_ids
from lmforge.generate.chat import ChatSession
from test_serve import make_run

GREEDY = GenerateConfig(greedy=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return load(str(make_run(tmp_path_factory.mktemp("chat-edge"), block_size=128)), device="cpu")


def conversation(pad: int) -> list[dict]:
    return [{"role": "system", "content": "S"}, {"role": "user", "content": "x" * pad},
            {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]


@pytest.mark.parametrize("extra", [0, 1])
def test_a_conversation_filling_the_context_exactly_is_read_whole(generator, extra):
    session = ChatSession(generator, GREEDY, system="S")
    block = generator.model.config.block_size

    def used(messages: list[dict]) -> int:
        n = len(prompt_ids(generator.tokenizer, generator.render_chat(messages)))
        return n + session.config.new_tokens(n)

    pad = 1 + block - used(conversation(1)) + extra  # a byte tokenizer: one token per character
    session.messages = conversation(pad)
    assert used(session.messages) == block + extra
    want = session.messages if extra == 0 else [session.messages[0], session.messages[-1]]
    assert session.context() == want
