"""Weight sync over SGLang's distributed update API, end to end on CPU (gloo): learner -> process
group -> embedded server -> the new weights serve, with the bodies checked against SGLang's own
request structs."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import os
import sys

import numpy as np
import pytest

from _source_ast import parse_file

from aepo_jax.rollout.testing import make_tiny_model_dir

pytest.importorskip("torch")

VOCAB = 256
SERVER_ARGS = ["--max-batch", "8", "--batch-buckets", "8", "--prompt-buckets", "16", "--gen-buckets", "16"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ds")
    return (make_tiny_model_dir(str(base / "served"), seed=0, vocab_size=VOCAB, init_std=0.3),
            make_tiny_model_dir(str(base / "learner"), seed=5, vocab_size=VOCAB, init_std=0.3))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    sp = launch_server(dirs[0], extra_args=SERVER_ARGS, wait_s=240,
                       log_path=str(tmp_path_factory.mktemp("ds_log") / "server.log"))
    yield sp
    sp.stop()


def _learner_logprobs(model, prompt, output):
    import jax.numpy as jnp

    logits = np.asarray(model(jnp.asarray([list(prompt) + list(output)], jnp.int32))[0], np.float64)
    lp = logits[len(prompt) - 1:-1]
    lp = lp - lp.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return lp[np.arange(len(output)), output]


def _params(model):
    from aepo_jax.models.decoder import param_paths

    return {p: np.asarray(v.get_value()) for p, v in param_paths(model)}


# --------------------------------------------------------------------------- pieces
def test_hf_device_tensors_are_the_exported_checkpoint_and_load_back(dirs, tmp_path):
    from safetensors.numpy import load_file

    from aepo_jax.models import from_hf_tensors, hf_device_tensors, hf_tensor_specs, load_pretrained, save_pretrained

    model = load_pretrained(dirs[1], dtype="float32", mesh="4x2")
    tensors = {n: np.asarray(a) for n, a in hf_device_tensors(model, "float32")}
    assert [(n, tuple(a.shape)) for n, a in tensors.items()] == hf_tensor_specs(model.cfg)
    save_pretrained(model, tmp_path / "x", dtype="float32")
    on_disk = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert set(on_disk) == set(tensors)
    for n, a in tensors.items():
        np.testing.assert_array_equal(a, on_disk[n])
    back = from_hf_tensors(model.cfg, tensors, dtype="float32", mesh="2x4")
    want, got = _params(model), _params(back)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    from aepo_jax.models import CheckpointError

    first = next(iter(tensors))
    with pytest.raises(CheckpointError, match=first.replace(".", r"\.")):
        from_hf_tensors(model.cfg, {k: v for k, v in tensors.items() if k != first})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_buckets_cover_every_tensor_once_in_order_and_unflatten_exactly(seed):
    import jax.numpy as jnp

    from aepo_jax.rollout.dist_group import BucketLayout, plan_buckets
    from aepo_jax.rollout.dist_sync import _flatten

    rng = np.random.default_rng(seed)
    specs = [(f"t{i}", tuple(int(d) for d in rng.integers(1, 9, size=rng.integers(1, 4)))) for i in range(20)]
    cap = int(rng.integers(8, 400))
    plan = plan_buckets(specs, 4, cap)
    assert [i for b in plan for i in b] == list(range(len(specs)))
    for b in plan:
        size = sum(int(np.prod(specs[i][1])) * 4 for i in b)
        assert size <= cap or len(b) == 1
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in specs}
    for b in plan:
        names = [specs[i][0] for i in b]
        lay = BucketLayout.of(names, ["float32"] * len(b), [specs[i][1] for i in b])
        flat = np.asarray(_flatten(*[jnp.asarray(arrays[n]) for n in names])).view(np.uint8)
        assert flat.size == lay.total_bytes
        for n, a in lay.unflatten(flat).items():
            np.testing.assert_array_equal(a, arrays[n])
    with pytest.raises(ValueError, match="t1: byte offset 2"):  # SGLang's receiver refuses it too
        BucketLayout.of(["t0", "t1"], ["bfloat16", "float32"], [[1], [1]])


def test_missing_torch_is_a_clear_error(monkeypatch):
    from aepo_jax.rollout import dist_group

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"rollout.sync=distributed needs torch.*distributed"):
        dist_group.require_torch()


# --------------------------------------------------------------------------- SGLang's request structs
def _sglang_structs():
    """SGLang 0.5.23's request structs, executed from io_struct.py's own class definitions (the
    module itself cannot be imported without SGLang's GPU stack). array_like/tag only change the
    IPC encoding; the HTTP layer validates the fields as a typed dict, which msgspec.convert does."""
    msgspec = pytest.importorskip("msgspec")
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang==0.5.23 is not installed (pip install --no-deps sglang==0.5.23)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "srt", "managers", "io_struct.py")
    tree = parse_file(path)
    want = ["BaseReq", "InitWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput",
            "DestroyWeightsUpdateGroupReqInput", "PauseGenerationReqInput", "ContinueGenerationReqInput"]
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    body = []
    for name in want:
        node = classes[name]
        node.keywords = [k for k in node.keywords if k.arg == "kw_only"]
        node.body = [s for s in node.body if isinstance(s, ast.AnnAssign)] or [ast.Pass()]
        node.decorator_list = []
        body.append(node)
    mod = ast.Module(body=body, type_ignores=[])
    import types

    module = types.ModuleType("sgl_io_struct_requests")  # the structs' annotations resolve in here
    sys.modules[module.__name__] = module
    ns = module.__dict__
    exec("from typing import *\nimport msgspec", ns)
    exec(compile(ast.fix_missing_locations(mod), path, "exec"), ns)
    return msgspec, ns


class _Recorder:
    """A RolloutClient transport that records bodies instead of sending them."""

    def __init__(self):
        self.bodies = []

    async def post_each(self, urls, path, body, timeout_s=None):
        self.bodies.append((path, body))
        ok = {"success": True, "message": "ok"}
        return {u: (200, ok) for u in urls}


def test_client_bodies_are_sglangs_request_structs():
    msgspec, ns = _sglang_structs()
    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.dist_recv import WeightReceiver

    client = RolloutClient("http://127.0.0.1:1")
    client._pool = _Recorder()

    async def go():
        await client.init_weights_update_group("http://127.0.0.1:1", master_address="10.0.0.1", master_port=29600,
                                               rank_offset=1, world_size=3, backend="gloo")
        await client.update_weights_from_distributed(["a.weight", "b.weight"], ["bfloat16", "bfloat16"],
                                                     [(4, 2), (3,)], weight_version="7")
        await client.pause_generation("retract")
        await client.continue_generation()
        await client.destroy_weights_update_group()

    asyncio.run(go())
    structs = {"/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
               "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
               "/pause_generation": "PauseGenerationReqInput", "/continue_generation": "ContinueGenerationReqInput",
               "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput"}
    assert [p for p, _ in client._pool.bodies] == list(structs)
    for path, body in client._pool.bodies:
        cls = ns[structs[path]]
        fields = {f.name for f in msgspec.structs.fields(cls)}
        assert set(body) <= fields, (path, set(body) - fields)  # SGLang would ignore the rest silently
        req = msgspec.convert(body, cls)
        for k, v in body.items():
            assert msgspec.to_builtins(getattr(req, k)) == v
        # and our server parses the same body to the same values
        if path == "/init_weights_update_group":
            assert WeightReceiver.parse_init(body).rank_offset == req.rank_offset == 1
        if path == "/update_weights_from_distributed":
            p = WeightReceiver.parse_update(body)
            assert p.layout.names == tuple(req.names) and p.layout.shapes == ((4, 2), (3,))
            assert p.load_format == req.load_format == "flattened_bucket" and p.weight_version == "7"
    # what SGLang refuses, ours refuses too, naming the field
    from aepo_jax.rollout.contract import RequestError

    for bad, field in (({"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "flush_cache": "yes"}, "flush_cache"),
                       ({"names": ["a"], "dtypes": ["float32"]}, "shapes")):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, ns["UpdateWeightsFromDistributedReqInput"])
        with pytest.raises(RequestError) as e:
            WeightReceiver.parse_update(bad)
        assert field in str(e.value.body)


# --------------------------------------------------------------------------- end to end
def test_distributed_sync_serves_the_learners_weights(server, dirs):
    from aepo_jax.models import load_pretrained
    from aepo_jax.rollout.client import RolloutClient, run_sync
    from aepo_jax.rollout.dist_sync import DistributedWeightSync

    learner = load_pretrained(dirs[1], dtype="float32")
    served0 = load_pretrained(dirs[0], dtype="float32")
    client = RolloutClient(server.url, backoff_s=0.05)
    prompts = [[1, 5, 9, 13], [200, 3]]

    async def go():
        async with client:
            sync = DistributedWeightSync(client, bucket_mb=0.05, timeout_s=120)  # several buckets
            try:
                r1 = await sync.sync(learner, "5")
                out1 = await client.generate(prompts, n=2, sampling_params={"max_new_tokens": 8, "ignore_eos": True},
                                             seed=3, temperature=1.0)
                r2 = await sync.sync(served0, "6")  # back to the first weights, through the same group
                out2 = await client.generate(prompts, n=1, sampling_params={"max_new_tokens": 8, "ignore_eos": True},
                                             seed=4, temperature=1.0)
                return r1, out1, r2, out2, await client.weight_versions()
            finally:
                await sync.close()

    r1, out1, r2, out2, versions = asyncio.run(go())
    assert r1.weight_version == "5" and r1.servers == [server.url] and r1.buckets > 1
    n_bytes = sum(int(np.prod(a.shape)) * 4 for a in _params(learner).values())
    assert r1.bytes == n_bytes and r1.gbps > 0 and 0 < r1.broadcast_s <= r1.send_s
    for i, row in enumerate(out1):
        for s in row:
            assert s.weight_version == "5"
            np.testing.assert_allclose(s.logprobs, _learner_logprobs(learner, prompts[i], s.output_ids), atol=1e-4)
    for i, row in enumerate(out2):
        for s in row:
            assert s.weight_version == "6"
            np.testing.assert_allclose(s.logprobs, _learner_logprobs(served0, prompts[i], s.output_ids), atol=1e-4)
    assert versions == {server.url: "6"}
    # the group is gone on the server: a distributed update now names the missing group
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "load_format": "flattened_bucket"}
    status, data, _ = run_sync(client._pool.request("POST", server.url, "/update_weights_from_distributed", body), client)
    assert status == 400 and data["success"] is False and "weight_update_group" in data["message"]
    assert run_sync(client.weight_versions(), client) == {server.url: "6"}


def test_bad_distributed_bodies_are_400_naming_the_field(server):
    from aepo_jax.rollout.client import RolloutClient, run_sync

    client = RolloutClient(server.url)
    cases = [("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2}, "rank_offset"),
             ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                             "world_size": 2, "backend": "mpi"}, "backend"),
             ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["int8"], "shapes": [[1]]}, "dtypes[0]"),
             ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                                   "load_format": "direct"}, "load_format")]
    for path, body, field in cases:
        status, data, _ = run_sync(client._pool.request("POST", server.url, path, body), client)
        assert status == 400 and field in str(data), (path, data)


def test_connect_fails_at_once_when_a_server_refuses_to_join(server):
    import time

    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.dist_sync import DistributedWeightSync
    from aepo_jax.rollout.weight_sync import WeightSyncError

    client = RolloutClient(server.url)

    async def go():
        async with client:
            first = DistributedWeightSync(client, timeout_s=60)
            await first.connect()
            try:
                second = DistributedWeightSync(client, timeout_s=8)  # same group name: the server refuses
                t = time.perf_counter()
                with pytest.raises(WeightSyncError, match="already exists"):
                    await second.connect()
                assert time.perf_counter() - t < 6  # not after our own join timed out
            finally:
                await first.close()

    asyncio.run(go())


def test_tensor_by_tensor_update_without_buckets(server, dirs):
    """``load_format: null``: one broadcast per tensor, in names order (SGLang's default format),
    split over two requests; the weights swap only when the second completes the model."""
    import torch
    import torch.distributed as dist

    from aepo_jax.models import hf_device_tensors, load_pretrained
    from aepo_jax.rollout.client import RolloutClient
    from aepo_jax.rollout.dist_group import join_group, leave_group
    from aepo_jax.rollout.dist_sync import _free_port

    learner = load_pretrained(dirs[1], dtype="float32")
    tensors = [(n, np.asarray(a)) for n, a in hf_device_tensors(learner, "float32")]
    half = len(tensors) // 2
    client = RolloutClient(server.url)

    async def go():
        async with client:
            port = _free_port("127.0.0.1")
            init = asyncio.ensure_future(client.init_weights_update_group(
                server.url, master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2, backend="gloo"))
            pg = await asyncio.to_thread(join_group, "127.0.0.1", port, 0, 2, "weight_update_group", "gloo", 60)
            await init
            seen = []
            try:
                for k, part in enumerate((tensors[:half], tensors[half:])):
                    post = asyncio.ensure_future(client.update_weights_from_distributed(
                        [n for n, _ in part], ["float32"] * len(part), [a.shape for _, a in part],
                        weight_version=f"tbt{k}", load_format=None))

                    def send(part=part):
                        for _, a in part:
                            dist.broadcast(torch.from_numpy(np.array(a)), src=0, group=pg)

                    await asyncio.to_thread(send)
                    await post
                    seen.append((await client.weight_versions())[server.url])
                out = await client.generate([[1, 5, 9]], n=1, sampling_params={"max_new_tokens": 6, "ignore_eos": True},
                                            seed=1, temperature=1.0)
            finally:
                await client.destroy_weights_update_group()
                leave_group(pg)
            return seen, out

    seen, out = asyncio.run(go())
    assert seen[0] != "tbt0" and seen[1] == "tbt1"  # half a model is staged, not served
    s = out[0][0]
    assert s.weight_version == "tbt1"
    np.testing.assert_allclose(s.logprobs, _learner_logprobs(learner, [1, 5, 9], s.output_ids), atol=1e-4)
