"""`lorakit chat`: one answer through a pipe, and the interactive commands."""

import subprocess
import sys

import pytest

from lorakit import chat

pytestmark = pytest.mark.slow


def test_a_question_piped_to_chat_prints_one_answer_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "chat", "smollm2-135m", "--max-new-tokens", "16"],
                            input="What is the capital of France?\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "<|im_end|>" not in result.stdout
    assert result.stdout.count("\n") == 1  # one answer, one line


def test_interactive_chat_keeps_history_and_obeys_commands(tiny_model_dir, monkeypatch, capsys):
    lines = iter(["Hello", "/system Be terse.", "Hi again", "/reset", "/help", "/exit"])
    seen = []
    real_reply = chat.Reply

    def recording_reply(model, messages, **kwargs):
        seen.append([m["role"] for m in messages])
        return real_reply(model, messages, **kwargs)

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    monkeypatch.setattr(chat, "Reply", recording_reply)
    chat.chat(tiny_model_dir, max_new_tokens=3)
    # /system clears the history and leads the next conversation; /reset clears it again.
    assert seen == [["user"], ["system", "user"]]
    out = capsys.readouterr()
    assert out.out.count("bot> ") == 2 and "/reset clears the history" in out.err
