"""Packaging: every third-party import of the package is a declared dependency, and CI runs the
README's own commands (the first run in a venv with only the runtime dependencies, then the
test command verbatim)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from _source_ast import parse_files

ROOT = Path(__file__).resolve().parent.parent
# Test helpers that live in the package (tiny models built with torch); never imported at run time.
TEST_ONLY_MODULES = {"aepo_jax/rollout/testing.py"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.\-]+", req.strip()).group(0))


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_req_name(r) for r in project["dependencies"]}
    extras = {_req_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return runtime, extras


def _third_party_imports():
    """(file, line, top-level module, lazy) for every non-stdlib import under aepo_jax/; lazy means
    inside a function (imported only when that feature is used)."""
    out = []
    paths = [p for p in sorted((ROOT / "aepo_jax").rglob("*.py"))
             if p.relative_to(ROOT).as_posix() not in TEST_ONLY_MODULES]
    for path, tree in zip(paths, parse_files(paths)):
        rel = path.relative_to(ROOT).as_posix()
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            lazy, p = False, parents.get(node)
            while p is not None:
                lazy |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
                p = parents.get(p)
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "aepo_jax":
                    out.append((rel, node.lineno, top, lazy))
    return out


def test_every_third_party_import_is_declared():
    runtime, extras = _declared()
    dists = md.packages_distributions()
    imports = _third_party_imports()
    assert len({m for _, _, m, _ in imports}) >= 10  # the scan sees the package's real imports
    bad = []
    for rel, line, module, lazy in imports:
        names = {_norm(d) for d in dists.get(module, [module])}
        if names & runtime:
            continue
        if lazy and names & extras:
            continue  # an optional feature (e.g. W&B logging) behind its extra
        bad.append(f"{rel}:{line}: {module} (distribution {sorted(names)})")
    assert not bad, "imports not declared in pyproject.toml's dependencies:\n" + "\n".join(bad)


def _readme_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(marker)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    return block.group(1).strip()


def test_ci_runs_the_readme_first_run_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [ln.strip() for ln in ci.splitlines()]
    test_cmd = _readme_block_after("Install and run the test suite")
    assert "pytest" in test_cmd and test_cmd in ci_lines, "README's test command must be a line of .ci/run"
    main_cmd = _readme_block_after("## Quick start")
    assert main_cmd.endswith("pip install -e . && python -m aepo_jax.train")
    # The first-run step: only the runtime install, an empty HOME and cache, the main command.
    first = ci[: ci.index(test_cmd)]
    assert re.search(r"pip\"? install -q -e \.\s*$", first, re.M) and ".[test]" not in first
    assert re.search(r"HOME=\S+ \\?\s*AEPO_JAX_CACHE=", first) and "env -i" in first
    assert re.search(r"python -m aepo_jax\.train --train\.steps=\d+", first)
