"""Entry-point set-up (aepo_jax/platform.py): the CLI's logging survives absl's own basicConfig."""

import subprocess
import sys

SCRIPT = r"""
import logging, sys
{before}
from aepo_jax.platform import setup_cli_logging
setup_cli_logging("INFO")
logging.getLogger("aepo_jax.probe").info("probe line")
logging.getLogger("aepo_jax.probe").debug("hidden line")
print(len(logging.getLogger().handlers))
"""


def _run(before: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(before=before)], capture_output=True, text=True,
                          timeout=120)


def test_info_lines_print_after_absl_configured_the_root_logger():
    """absl (through orbax) calls basicConfig() at WARNING before main runs; our INFO lines must
    still reach stderr, in our format, through one handler (no duplicated lines)."""
    p = _run("from absl import logging as absl_logging\nabsl_logging.warning('absl first')")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "probe line" in ln]
    assert len(lines) == 1 and " INFO aepo_jax.probe: probe line" in lines[0], p.stderr
    assert "hidden line" not in p.stderr
    assert p.stdout.strip() == "1"


def test_info_lines_print_on_a_fresh_root_logger():
    p = _run("")
    assert p.returncode == 0, p.stderr
    assert " INFO aepo_jax.probe: probe line" in p.stderr and "hidden line" not in p.stderr
    assert p.stdout.strip() == "1"
