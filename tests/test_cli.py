"""The `lorafit` command end to end on the default model (as the README's demo runs it)."""

import subprocess
import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def default_model_ready(smollm2_dir):
    """Converts the default model once before the subprocesses need it."""


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lorafit", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_generate_answers_the_demo_question():
    run = run_cli("generate", "--max-new-tokens", "32", "What is the capital of France?")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_chat_keeps_history_and_quits_on_empty_line():
    run = run_cli("chat", "--max-new-tokens", "24", stdin="What is the capital of France?\nAnd of Italy?\n\n")
    assert run.returncode == 0, run.stderr
    # stdin is a pipe, so each "you> " prompt shares its line with the answer printed after it.
    answers = [line.split("assistant> ", 1)[1] for line in run.stdout.splitlines() if "assistant> " in line]
    assert len(answers) == 2
    assert "Paris" in answers[0]
    assert "Rome" in answers[1]  # only answerable with the first turn in the history
