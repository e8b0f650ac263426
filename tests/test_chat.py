"""`lmforge chat` and generate.ChatSession: each reply is the model's continuation of the whole conversation through
its chat template (checked against the decoding core called directly), the conversation is kept, /reset forgets it,
the oldest turns make room when it outgrows the context, and the CLI runs as a real process reading stdin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmforge.errors import ConfigError
from lmforge.generate import GenerateConfig, generate, load, prompt_ids
from lmforge.generate.chat import ChatSession
from test_serve import make_run

GREEDY = GenerateConfig(greedy=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """test_serve's tiny random byte-level model that never ends, with a 256-token context."""
    return make_run(tmp_path_factory.mktemp("chat"), block_size=256)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("chat-short"), block_size=128)


def reply_to(generator, messages: list[dict], config: GenerateConfig = GREEDY) -> str:
    """The reference: the decoding core continuing the rendered conversation, stopping at the next user turn."""
    stops = list(config.stop_strings or []) + [generator.chat_stop()]
    return generate(generator.model, generator.tokenizer, generator.render_chat(messages), config,
                    stop_strings=stops)


def test_each_reply_continues_the_whole_conversation_and_reset_forgets_it(run_dir):
    generator = load(str(run_dir), device="cpu")
    session = ChatSession(generator, GREEDY, system="Be brief.")
    first = "".join(session.say("hello"))
    system = {"role": "system", "content": "Be brief."}
    assert first == reply_to(generator, [system, {"role": "user", "content": "hello"}])
    second = "".join(session.say("and then?"))
    assert second == reply_to(generator, [system, {"role": "user", "content": "hello"},
                                          {"role": "assistant", "content": first},
                                          {"role": "user", "content": "and then?"}])
    assert second != reply_to(generator, [system, {"role": "user", "content": "and then?"}])  # history mattered
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [system] and "".join(session.say("hello")) == first
    with pytest.raises(ConfigError, match="one reply per turn"):
        ChatSession(generator, GenerateConfig(num_beams=2))


def test_the_oldest_turns_make_room_when_the_conversation_outgrows_the_context(short_run):
    generator = load(str(short_run), device="cpu")  # block_size 128
    session = ChatSession(generator, GREEDY, system="S")
    for text in ("first turn", "second turn", "third turn", "fourth"):
        "".join(session.say(text))
    system, context = session.messages[0], session.context()
    n = len(context) - 1  # the turns the model reads after the system prompt
    kept, earlier = session.messages[len(session.messages) - n:], session.messages[1:len(session.messages) - n]
    assert context == [system] + kept and earlier and kept[0]["role"] == "user"  # whole exchanges, the newest

    def fits(messages: list[dict]) -> bool:
        ids = prompt_ids(generator.tokenizer, generator.render_chat(messages))
        return len(ids) + 12 <= generator.model.config.block_size

    assert fits(context) and not fits([system] + earlier[-2:] + kept)  # one more exchange would not fit


def test_the_chat_command_reads_turns_from_stdin_and_prints_each_reply(run_dir):
    generator = load(str(run_dir), device="cpu")
    session = ChatSession(generator, GREEDY)
    want = "".join("".join(session.say(t)) + "\n" for t in ("hello", "how are you")) + "".join(session.say("x"))
    session.reset()
    want += "\n" + "".join(session.say("hello")) + "\n"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", str(run_dir), "--greedy", "--max-new-tokens",
                           "12", "--device", "cpu"], input="hello\nhow are you\n\nx\n/reset\nhello\n/exit\nignored\n",
                          capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == want
    assert "(a new conversation)" in done.stderr and "Traceback" not in done.stderr
