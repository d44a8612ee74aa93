"""CheckpointManager over real orbax and grain: round trips into shardings, retention, NaN refusal,
atomicity under SIGKILL, damaged checkpoints skipped, and a real full disk (tmpfs) / oversize write
mid-save."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from aepo_jax.trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    NoCheckpointError,
    NonFiniteStateError,
    check_json_extras,
    nonfinite_leaves,
    resolve_checkpoint,
    restore_params_numpy,
)


def _state(scale: float = 1.0):
    import jax
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.arange(32.0).reshape(8, 4) * scale, "b": jnp.ones(4, jnp.bfloat16) * scale}
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params), "rng": jax.random.key(11), "n": 3}


def _extras():
    return {
        "controller": {"temperature": 1.25, "history": [0.5, 0.25], "warm": True, "name": None},
        "np_rng": np.random.default_rng(5).bit_generator.state,  # holds 128-bit ints
        "tuple": (1, "a"),
        "num_updates": 12,
    }


def _data_iterator(seed: int = 3):
    """A grain iterator over a shuffled range: its position is the per-process state to keep."""
    import grain

    return iter(grain.MapDataset.range(1000).shuffle(seed=seed).to_iter_dataset())


def _assert_tree_equal(a, b):
    import jax

    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_state_extras_and_data_iterator(tmp_path, async_save):
    import jax

    state = _state()
    it = _data_iterator()
    consumed = [next(it) for _ in range(int(np.random.default_rng().integers(1, 50)))]
    with CheckpointManager(tmp_path / "ckpt", async_save=async_save, data_iterator=it) as m:
        assert m.latest_step() is None
        assert m.save(7, state, _extras())
        after_save = [next(it) for _ in range(5)]  # the saved position is the one at save time
    assert (tmp_path / "ckpt" / "7" / "data" / "process_0-of-1.json").is_file()  # grain's layout
    # A new manager on the same directory resumes: sees the step, restores everything exactly.
    fresh = _data_iterator()
    with CheckpointManager(tmp_path / "ckpt", data_iterator=fresh) as m:
        assert m.latest_step() == 7
        target = jax.tree.map(lambda x: x, state)
        r = m.restore(target=target)
    assert r.step == 7
    _assert_tree_equal(r.state, state)
    assert [next(fresh) for _ in range(5)] == after_save and consumed[-1] != after_save[0]
    ex = r.extras
    assert ex["controller"] == {"temperature": 1.25, "history": [0.5, 0.25], "warm": True, "name": None}
    assert ex["np_rng"] == np.random.default_rng(5).bit_generator.state
    g = np.random.default_rng()
    g.bit_generator.state = ex["np_rng"]
    assert g.random() == np.random.default_rng(5).random()
    assert ex["tuple"] == [1, "a"] and ex["num_updates"] == 12


def test_restore_into_other_shardings(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() >= 8
    mesh42 = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    mesh24 = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh42, P("data", "tensor")))
    m_ = jax.device_put(jnp.ones((8, 8)) * 2, NamedSharding(mesh42, P(None, "data")))
    with CheckpointManager(tmp_path, async_save=True) as m:
        m.save(1, {"params": {"w": w}, "opt_state": {"m": m_}})
        new = {"params": {"w": NamedSharding(mesh24, P("tensor", "data"))}, "opt_state": {"m": NamedSharding(mesh24, P())}}
        target = {
            "params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=new["params"]["w"])},
            "opt_state": {"m": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=new["opt_state"]["m"])},
        }
        r = m.restore(target=target)
        assert r.state["params"]["w"].sharding == new["params"]["w"]
        assert r.state["opt_state"]["m"].sharding == new["opt_state"]["m"]
        np.testing.assert_array_equal(np.asarray(r.state["params"]["w"]), np.arange(64.0).reshape(8, 8))
        # partial: params only (what a learner-only consumer needs); the optimizer state stays on disk.
        p = m.restore(target={"params": target["params"]}, partial=True)
        assert set(p.state) == {"params"}
        # a target that does not match what was saved: a clear error naming the step
        with pytest.raises(CheckpointError, match="restoring step 1"):
            m.restore(target={"params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=new["params"]["w"])}})


def test_save_every_keep_last_and_step_errors(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, save_every=3, keep_last=2) as m:
        saved = [s for s in range(1, 11) if m.save(s, state)]
        assert saved == [3, 6, 9]
        assert m.all_steps() == [6, 9]
        assert m.save(10, state, force=True)  # the loop's final step
        assert m.all_steps() == [9, 10]
        assert not m.should_save(9) and m.should_save(12)
        with pytest.raises(NoCheckpointError, match=r"step 3 not found .*\[9, 10\]"):
            m.restore(step=3)
        assert m.restore(step=9).step == 9
        with pytest.raises(CheckpointSaveError, match="step 10"):
            m.save(10, state, force=True)  # never overwrite a complete checkpoint
        assert m.all_steps() == [9, 10]
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_nonfinite_state_or_extras_is_refused_and_nothing_written(tmp_path):
    import jax.numpy as jnp

    good = _state()
    with CheckpointManager(tmp_path) as m:
        m.save(1, good)
        bad = dict(good, params={"w": good["params"]["w"].at[2, 1].set(jnp.nan), "b": good["params"]["b"]})
        with pytest.raises(NonFiniteStateError, match=r"step 2: NaN/inf in state leaves \['params'\]\['w'\].*step 1"):
            m.save(2, bad)
        inf_bf16 = dict(good, params={"w": good["params"]["w"], "b": good["params"]["b"].at[0].set(jnp.inf)})
        with pytest.raises(NonFiniteStateError, match=r"\['params'\]\['b'\]"):
            m.save(2, inf_bf16)
        with pytest.raises(NonFiniteStateError, match=r"\['params'\]\['x'\]"):
            m.save(2, {"params": {"x": np.array([1.0, np.inf])}})
        with pytest.raises(NonFiniteStateError, match=r"extras\['controller'\]\['t'\] = nan"):
            m.save(2, good, {"controller": {"t": float("nan")}})
        with pytest.raises(TypeError, match=r"extras\['obj'\] has unsupported type object"):
            m.save(2, good, {"obj": object()})
        assert m.all_steps() == [1]
        assert m.save(2, good)  # the refusals consumed nothing
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_nonfinite_leaves_ignores_ints_and_keys():
    import jax
    import jax.numpy as jnp

    tree = {"i": jnp.arange(3), "k": jax.random.key(0), "f": jnp.zeros(2), "py": 1.5, "pynan": float("nan")}
    assert nonfinite_leaves(tree) == ["['pynan']"]


def test_extras_must_be_plain_json():
    with pytest.raises(TypeError, match=r"extras has a non-string key 1"):
        check_json_extras({1: 2})
    for bad, where in ((np.float32(0.5), "['x']"), (b"raw", "['x']"), (np.zeros(2), "['x']")):
        with pytest.raises(TypeError, match=re.escape(f"extras{where} has unsupported type")):
            check_json_extras({"x": bad})
    with pytest.raises(NonFiniteStateError, match=r"extras\['a'\]\[1\] = inf"):
        check_json_extras({"a": [1.0, float("inf")]})
    check_json_extras({"a": [1, 2.5, None, True, "s", (3, {"b": -0.0})]})  # plain JSON passes


def test_resolve_checkpoint_paths(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as m:
        m.save(4, _state())
        m.save(8, _state(2.0))
    assert resolve_checkpoint(run) == (run / "checkpoints", None)
    assert resolve_checkpoint(run / "4") == (run / "checkpoints", 4)
    assert resolve_checkpoint(run / "checkpoints") == (run / "checkpoints", None)
    assert resolve_checkpoint(run / "checkpoints" / "8") == (run / "checkpoints", 8)
    with pytest.raises(NoCheckpointError, match=r"step 5 not found .*\[4, 8\]"):
        resolve_checkpoint(run / "5")
    with pytest.raises(NoCheckpointError, match="no checkpoints under"):
        resolve_checkpoint(tmp_path / "elsewhere")
    numeric_run = tmp_path / "2026"  # a run directory named like a step is still a run directory
    (numeric_run / "checkpoints").mkdir(parents=True)
    assert resolve_checkpoint(numeric_run) == (numeric_run / "checkpoints", None)
    step, params = restore_params_numpy(run)
    assert step == 8 and isinstance(params["w"], np.ndarray)
    np.testing.assert_array_equal(params["w"], np.arange(32.0).reshape(8, 4) * 2)
    assert set(params) == {"w", "b"} and params["b"].dtype.name == "bfloat16"
    assert restore_params_numpy(run / "4")[0] == 4
    with pytest.raises(CheckpointError, match="no top-level state key 'model'"):
        restore_params_numpy(run, key="model")


_KILL_CHILD = textwrap.dedent(
    """
    import itertools, sys
    import grain, jax.numpy as jnp, numpy as np
    from aepo_jax.trainer.checkpoint import CheckpointManager
    it = iter(grain.MapDataset.range(10**6).to_iter_dataset())
    m = CheckpointManager(sys.argv[1], keep_last=2, async_save=sys.argv[2] == "1", data_iterator=it)
    start = (m.restore().step if m.latest_step() else 0) + 1
    print("START", start, flush=True)
    for s in itertools.count(start):
        assert next(it) == s - 1  # the iterator resumed where the restored step left it
        # Every leaf, the extras and the iterator encode the step: a mixed/partial checkpoint shows.
        big = jnp.full((int(sys.argv[3]),), float(s))
        m.save(s, {"params": {"w": big, "v": big[:17] * 2}, "step": jnp.int32(s)}, {"step": s, "blob": "x" * s})
        print("SAVED", s, flush=True)
    """
)


def _check_consistent(ckpt):
    import grain

    # read_only: verifying must not clean up the (killed) writer's temporary directories.
    it = iter(grain.MapDataset.range(10**6).to_iter_dataset())
    with CheckpointManager(ckpt, read_only=True, data_iterator=it) as m:
        step = m.latest_step()
        if step is None:  # killed before its first save completed: nothing, but nothing broken
            assert m.all_steps() == []
            return 0
        r = m.restore()
    assert r.step == step  # the latest complete step is intact (no fallback needed)
    w = np.asarray(r.state["params"]["w"])
    assert np.all(w == step) and np.all(np.asarray(r.state["params"]["v"]) == 2 * step)
    assert int(r.state["step"]) == step and r.extras == {"step": step, "blob": "x" * step}
    assert next(it) == step
    return step


@pytest.mark.parametrize("async_save", ["1", "0"])
def test_sigkill_at_any_moment_leaves_a_complete_latest(tmp_path, async_save):
    ckpt = tmp_path / "ckpt"
    rng = random.Random(1234 + int(async_save))
    prev_latest = 0
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(ckpt), async_save, "1000000"],  # 4 MB per leaf
            stdout=subprocess.PIPE, text=True,
        )
        line = proc.stdout.readline()
        assert line.startswith("START"), line
        assert int(line.split()[1]) == prev_latest + 1  # resumed right after the last complete step
        first = proc.stdout.readline()  # wait for progress (slow start-up on a loaded machine) ...
        assert first.startswith("SAVED"), first
        time.sleep(rng.uniform(0.0, 0.6))  # ... then kill inside a save, a finalize or a deletion
        os.kill(proc.pid, signal.SIGKILL)
        out = first + proc.communicate()[0]
        saved = [int(x.split()[1]) for x in out.splitlines() if x.startswith("SAVED")]
        latest = _check_consistent(ckpt)
        # save(s+1) waits for s, so everything before the last reported save is on disk
        assert latest >= saved[-1] - (1 if async_save == "1" else 0)
        assert latest >= prev_latest
        # never more than keep_last complete steps, +1 if killed between a save and its retention
        with CheckpointManager(ckpt, read_only=True) as ro:
            assert len(ro.all_steps()) <= 3
        prev_latest = latest


def test_async_save_completes_when_the_loop_fails_inside_the_with_block(tmp_path):
    script = textwrap.dedent(
        """
        import sys, jax.numpy as jnp
        from aepo_jax.trainer.checkpoint import CheckpointManager
        with CheckpointManager(sys.argv[1], async_save=True) as m:
            m.save(1, {"params": {"w": jnp.full((1000,), 1.0)}}, {"k": 1})
            m.save(2, {"params": {"w": jnp.full((4_000_000,), 3.0)}}, {"k": 2})
            raise RuntimeError("the loop failed while step 2 was being written")
        """
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "the loop failed while step 2" in r.stderr, r.stderr[-2000:]
    with CheckpointManager(tmp_path, read_only=True) as m:
        restored = m.restore()
    assert restored.step == 2 and restored.extras == {"k": 2}
    assert float(np.asarray(restored.state["params"]["w"]).min()) == 3.0


_DISK_FULL_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import jax.numpy as jnp, numpy as np
    from aepo_jax.trainer.checkpoint import CheckpointManager, CheckpointSaveError
    root, mode, async_save = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    ckpt = os.path.join(root, "ckpt")
    n = 200_000  # 800 KB of incompressible float32 per checkpoint
    def state(seed):
        return {"params": {"w": jnp.asarray(np.random.default_rng(seed).standard_normal(n).astype(np.float32))}}
    out = {}
    m = CheckpointManager(ckpt, keep_last=1, async_save=async_save)
    m.save(1, state(1), {"s": 1})
    m.wait()
    if mode == "fsize":  # the OS refuses any file larger than 400 KB from now on (EFBIG)
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))
    try:
        m.save(2, state(2), {"s": 2})
        m.wait()
        out["error"] = None
    except CheckpointSaveError as e:
        out["error"] = str(e)
    out["listing"] = sorted(os.listdir(ckpt))
    out["latest"] = m.latest_step()
    r = m.restore()
    out["restored_step"] = r.step
    out["restored_ok"] = bool(np.array_equal(np.asarray(r.state["params"]["w"]), np.asarray(state(1)["params"]["w"])))
    out["extras"] = r.extras
    # Once space is back, the next save works and retention then drops the old step.
    if mode == "tmpfs":
        os.remove(os.path.join(root, "filler"))
    else:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    m.save(3, state(3), {"s": 3})
    m.close()
    out["after_retry"] = sorted(os.listdir(ckpt))
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _run_disk_full(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"child failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rc=$?; rmdir $d; exit $rc"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.parametrize("async_save", ["0", "1"])
def test_full_disk_mid_save_keeps_previous_checkpoint(tmp_path, async_save):
    """A real ENOSPC: the run directory lives on a 2 MB tmpfs (private mount namespace)."""
    if not _unshare_works():
        pytest.skip("needs unshare + tmpfs mounts (user/mount namespaces)")
    root = tmp_path / "mnt"
    root.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_DISK_FULL_CHILD)
    # 0.6 MB filler + 0.8 MB checkpoint fit in 2 MB; a second 0.8 MB checkpoint does not.
    sh = (
        f"mount -t tmpfs -o size=2m tmpfs {root} && head -c 600000 /dev/urandom > {root}/filler && "
        f"{sys.executable} {script} {root} tmpfs {async_save}"
    )
    out = _run_disk_full(["unshare", "-rm", "sh", "-c", sh])
    assert out["error"] is not None
    assert "saving step 2" in out["error"] and "disk full" in out["error"]
    assert "previous checkpoint (step 1) is intact" in out["error"]
    assert out["listing"] == ["1"]  # the partial write was removed, freeing the space
    assert out["latest"] == 1 and out["restored_step"] == 1 and out["restored_ok"]
    assert out["extras"] == {"s": 1}
    assert out["after_retry"] == ["3"]


def test_oversize_write_mid_save_keeps_previous_checkpoint(tmp_path):
    """The same guarantee without namespaces: RLIMIT_FSIZE makes the kernel fail the write (EFBIG)."""
    script = tmp_path / "child.py"
    script.write_text(_DISK_FULL_CHILD)
    out = _run_disk_full([sys.executable, str(script), str(tmp_path), "fsize", "1"])
    assert out["error"] is not None and "saving step 2" in out["error"]
    assert "File too large" in out["error"] or "os_error_code='27'" in out["error"], out["error"]
    assert out["listing"] == ["1"] and out["restored_ok"] and out["extras"] == {"s": 1}
    assert out["after_retry"] == ["3"]


def test_read_only_manager_cannot_save_and_keeps_tmp_dirs(tmp_path):
    with CheckpointManager(tmp_path) as m:
        m.save(1, _state())
    leftover = tmp_path / "2.orbax-checkpoint-tmp"  # a killed write
    leftover.mkdir()
    (tmp_path / "0.orbax-checkpoint-tmp-deleting").mkdir()  # a killed retention delete
    with CheckpointManager(tmp_path, read_only=True) as r:
        assert r.all_steps() == [1]  # an in-progress/partial directory is never a step
    assert leftover.exists()
    with CheckpointManager(tmp_path) as w:  # a writer (the resumed run) cleans them up
        assert w.latest_step() == 1
        w.save(2, _state())
        assert w.all_steps() == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


# ---------------------------------------------------------------------------------------------
# tools/export_hf.py: checkpoint params -> a Hugging Face directory transformers loads.
# ---------------------------------------------------------------------------------------------

EXPORT_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "export_hf.py")


def _tiny_hf_base(out_dir):
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(out_dir)
    cfg = T.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    T.Qwen2ForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def _load_export_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_hf", EXPORT_TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_hf_logits_equal_the_learners(tmp_path):
    pytest.importorskip("aepo_jax.models")
    import jax
    import optax
    import torch
    import transformers as T
    from flax import nnx

    from aepo_jax.models import load_pretrained

    base = _tiny_hf_base(str(tmp_path / "base"))
    graphdef, params0 = nnx.split(load_pretrained(base))
    rng = np.random.default_rng(0)
    # "trained" weights: every tensor moved away from the base model's
    params1 = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params0)
    ids = np.array([[1, 5, 9, 30, 2, 7, 40], [1, 3, 3, 60, 61, 62, 4]], np.int32)
    mask = np.ones_like(ids)
    learner_logits = {s: np.asarray(nnx.merge(graphdef, p)(ids, attention_mask=mask)) for s, p in ((2, params0), (4, params1))}
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as m:
        for s, p in ((2, params0), (4, params1)):
            m.save(s, {"params": p, "opt_state": optax.adamw(1e-3).init(p), "rng": jax.random.key(s)}, {"it": "x"})
    (run / "config.yaml").write_text(f"model:\n  path: {base}\nrollout:\n  urls: []\n")

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, EXPORT_TOOL, "--checkpoint", str(run), "--out", str(out), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exported step 4" in r.stdout
    hf = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got, learner_logits[4], atol=2e-5, rtol=1e-5)
    assert np.abs(learner_logits[4] - learner_logits[2]).max() > 1e-2  # the check above could fail
    for fn in ("tokenizer.json", "tokenizer_config.json"):  # the base model's tokenizer travels along
        assert (out / fn).read_bytes() == (tmp_path / "base" / fn).read_bytes()

    # RUN/STEP picks an older step; bfloat16 halves the weights and still loads
    tool = _load_export_tool()
    step, written = tool.export(run / "2", tmp_path / "hf2", dtype="bfloat16")
    assert step == 2 and "model.safetensors" in written
    hf2 = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    with torch.no_grad():
        got2 = hf2(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got2, learner_logits[2], atol=5e-2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf2" / "model.safetensors"), framework="numpy") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def test_export_hf_errors_name_the_problem(tmp_path):
    pytest.importorskip("aepo_jax.models")
    tool = _load_export_tool()
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as m:
        m.save(1, {"params": {"embed": {"value": np.zeros((64, 32), np.float32)}}})
    with pytest.raises(tool.ExportError, match=r"config.yaml not found; pass --model-path"):
        tool.export(run, tmp_path / "o")
    (run / "config.yaml").write_text("model:\n  path: ''\n")
    with pytest.raises(tool.ExportError, match="has no model.path"):
        tool.export(run, tmp_path / "o")
    base = _tiny_hf_base(str(tmp_path / "base"))
    with pytest.raises(tool.ExportError, match=r"missing from the checkpoint: layers/attn/.*"):
        tool.export(run, tmp_path / "o", model_path=base)
    r = subprocess.run([sys.executable, EXPORT_TOOL, "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoints under" in r.stderr
    assert not (tmp_path / "o").exists()


def test_data_iterator_of_another_process_count(tmp_path):
    """grain writes one file per process; a run with another process count resumes when every
    saved position is the same (the trainer's case) and is refused, naming both counts, if not."""
    it = _data_iterator()
    for _ in range(9):
        next(it)
    with CheckpointManager(tmp_path, data_iterator=it) as m:
        m.save(5, _state())
    expected = [next(it) for _ in range(3)]
    data = tmp_path / "5" / "data"
    saved = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for pid in (0, 1):  # what two processes with the same stream write
        (data / f"process_{pid}-of-2.json").write_text(saved)
    fresh = _data_iterator()
    with CheckpointManager(tmp_path, data_iterator=fresh) as m:
        assert m.restore().step == 5
    assert [next(fresh) for _ in range(3)] == expected
    (data / "process_1-of-2.json").write_text(saved.replace("9", "7"))  # process 1 was elsewhere
    with CheckpointManager(tmp_path, data_iterator=_data_iterator()) as m:
        with pytest.raises(CheckpointError, match="saved by 2 processes .* this run has 1; resume with 2"):
            m.restore()
    assert (tmp_path / "5").is_dir()  # a topology problem is not damage: nothing moved aside


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: the newest intact step is restored, the damaged one is named and set aside.
# ---------------------------------------------------------------------------------------------

_DAMAGE = {
    # what gets truncated (to a random shorter length) or deleted in the latest step
    "truncate-every-file": ("**/*", "truncate"),
    "truncate-array-data": ("state/**/d/*", "truncate"),
    "truncate-tree-metadata": ("state/_METADATA", "truncate"),
    "truncate-extras": ("extras/metadata", "truncate"),
    "truncate-iterator-state": ("data/process_*.json", "truncate"),
    "missing-array-data": ("state/**/d/*", "delete"),
    "missing-iterator-state": ("data/process_*.json", "delete"),
}


def _damage(step_dir, pattern, how, rng):
    hit = [p for p in step_dir.glob(pattern) if p.is_file() and p.stat().st_size > 0]
    assert hit, pattern
    for p in hit:
        if how == "delete":
            p.unlink()
        else:
            with open(p, "r+b") as f:
                f.truncate(int(rng.integers(0, p.stat().st_size)))
    return hit


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact_step(tmp_path, damage, caplog):
    import jax

    rng = np.random.default_rng()
    n_steps = int(rng.integers(2, 5))
    it = _data_iterator()
    want = {}
    with CheckpointManager(tmp_path, keep_last=5, data_iterator=it) as m:
        for s in range(1, n_steps + 1):
            for _ in range(int(rng.integers(1, 4))):
                next(it)
            m.save(s, _state(float(s)), {"s": s})
            want[s] = [next(_copy_of(it)) for _ in range(1)]
    bad = n_steps
    _damage(tmp_path / str(bad), *_DAMAGE[damage], rng)

    fresh = _data_iterator()
    with caplog.at_level("WARNING", logger="aepo_jax.trainer.checkpoint"):
        with CheckpointManager(tmp_path, keep_last=5, data_iterator=fresh) as m:
            r = m.restore(target=jax.tree.map(lambda x: x, _state()))
            assert r.step == bad - 1 and r.extras == {"s": bad - 1}
            _assert_tree_equal(r.state["params"], _state(float(bad - 1))["params"])
            assert [next(fresh)] == want[bad - 1]
            # the damaged step is named, kept aside, and no longer a step: the run redoes it
            assert f"{tmp_path / str(bad)} is damaged" in caplog.text
            assert m.all_steps() == list(range(1, bad)) and (tmp_path / f"damaged-{bad}").is_dir()
            assert m.save(bad, _state(float(bad)), {"s": bad})
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.restore().extras == {"s": bad}


def _copy_of(it):
    """A second iterator at ``it``'s position (to read what comes next without moving ``it``)."""
    other = _data_iterator()
    other.set_state(it.get_state())
    return other


def test_every_step_damaged_or_a_wrong_target_is_one_clear_error(tmp_path):
    import jax
    import jax.numpy as jnp

    with CheckpointManager(tmp_path) as m:
        m.save(1, _state())
        m.save(2, _state(2.0))
    with CheckpointManager(tmp_path) as m:  # a target that fits no step: nothing is set aside
        with pytest.raises(CheckpointError, match=r"restoring step 2 .*older steps failed too: step 1"):
            m.restore(target={"params": {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}})
        assert m.all_steps() == [1, 2]
    rng = np.random.default_rng()
    for s in (1, 2):
        _damage(tmp_path / str(s), "state/**/d/*", "truncate", rng)
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(CheckpointError, match=r"restoring step 2 from .* failed \(damaged files"):
            m.restore()
        assert m.all_steps() == [1, 2]  # no intact step: nothing moved, the user decides


def test_export_reads_past_a_damaged_latest(tmp_path, caplog):
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as m:
        m.save(4, _state())
        m.save(8, _state(2.0))
    _damage(run / "checkpoints" / "8", "state/**/d/*", "delete", np.random.default_rng())
    with caplog.at_level("WARNING", logger="aepo_jax.trainer.checkpoint"):
        step, params = restore_params_numpy(run)
    assert step == 4 and "checkpoints/8 is damaged" in caplog.text
    np.testing.assert_array_equal(params["w"], np.arange(32.0).reshape(8, 4))
    assert (run / "checkpoints" / "8").is_dir()  # a reader never moves anything
