"""Shared by the multi-process tests: collect each child's last ``RESULT <json>`` line."""

from __future__ import annotations

import json
import subprocess


def collect_results(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Wait for every child (text-mode pipes); each must exit 0 and print ``RESULT <json>``.
    Children still running when one fails are killed, so a failing test leaves none behind."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
            assert p.returncode == 0 and lines, f"rc={p.returncode}\n{err[-4000:]}"
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
