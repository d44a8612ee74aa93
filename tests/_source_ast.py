"""``ast.parse`` of a file, done in a fresh interpreter.

CPython 3.11 keeps the AST converter's recursion counter in per-interpreter state, so an
``ast.parse`` in one thread can fail with "SystemError: AST constructor recursion depth mismatch"
when a finalizer releases the GIL mid-parse and another thread parses too (3.11's ``traceback``
parses source lines to place its carets, so any background thread printing a traceback counts;
fixed in 3.12). The test process has such threads (orbax's, left by earlier tests), so tests that
read source with ``ast`` parse it in a child process: it has no other threads, and the tree comes
back by pickle (rebuilding nodes does not touch that counter)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

_CHILD = ("import ast, pickle, sys\n"
          "paths = sys.argv[1:]\n"
          "sys.stdout.buffer.write(pickle.dumps([ast.parse(open(p, encoding='utf-8').read(), filename=p)"
          " for p in paths]))\n")


def parse_files(paths) -> list:
    """The ``ast.Module`` of each file, in order."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        return []
    out = subprocess.run([sys.executable, "-c", _CHILD, *paths], capture_output=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"parsing {paths[:3]}... failed in the child:\n{out.stderr.decode()[-2000:]}")
    return pickle.loads(out.stdout)


def parse_file(path):
    return parse_files([path])[0]
