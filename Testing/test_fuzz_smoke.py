"""A short fuzzing run over image and checkpoint headers (see fuzz_headers.py)."""

from fuzz_headers import run


def test_mutated_headers_are_read_or_refused_cleanly():
    run(examples=150)
