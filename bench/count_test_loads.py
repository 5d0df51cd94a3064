"""A pytest plugin that counts the heavy things a test session does, whoever does them: tokenizer reads, model
classes built (by class and depth), embedder loads and the subprocesses started. The counts do not depend on how
busy the CPU is, so they compare two versions of the suite where wall-clock times cannot (bench/TEST_SPEED.md).

    PYTHONPATH=bench pytest -p count_test_loads tests/integration ...

The summary is printed at the end of the session.
"""

from __future__ import annotations

import collections
import subprocess

COUNTS: collections.Counter[str] = collections.Counter()


def _count_tokenizer_reads() -> None:
    import transformers

    auto = transformers.AutoTokenizer
    real = auto.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        COUNTS["tokenizer read from disk (AutoTokenizer.from_pretrained)"] += 1
        return real(cls, *args, **kwargs)

    auto.from_pretrained = classmethod(from_pretrained)


def _count_models_built() -> None:
    import transformers

    real = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):  # every PreTrainedModel runs it once, at the end of __init__
        name = type(self).__name__
        if name.endswith(("ForCausalLM", "ForConditionalGeneration")):
            layers = self.config.get_text_config(decoder=True).num_hidden_layers
            COUNTS[f"model built: {name}, {layers} layers"] += 1
        return real(self, *args, **kwargs)

    transformers.PreTrainedModel.post_init = post_init


def _count_subprocesses() -> None:
    real = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
        words = [str(w) for w in (args if isinstance(args, (list, tuple)) else [args])]
        if "-c" in words:  # a script: its first line names it
            words = words[: words.index("-c") + 1] + [words[words.index("-c") + 1].strip().splitlines()[0]]
        if words and "python" in words[0]:
            COUNTS["python process: " + " ".join(words[1:4])] += 1
        return real(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = init


def pytest_configure(config) -> None:
    _count_tokenizer_reads()
    _count_models_built()
    _count_subprocesses()


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_sep("=", "heavy things done this session (bench/count_test_loads.py)")
    for key, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{n:4d}  {key}")
