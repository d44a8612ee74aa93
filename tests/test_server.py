"""The embedded SGLang-compatible server, as a real subprocess: every endpoint, bad input,
concurrency, weight updates (never mixed inside a response), abort and pause."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from aepo_jax.rollout.testing import load_sglang_api_types, make_tiny_model_dir

VOCAB = 320
SERVER_ARGS = ["--max-batch", "16", "--batch-buckets", "16", "--prompt-buckets", "32",
               "--gen-buckets", "16,256", "--random-seed", "0",
               "--max-n", "8", "--max-rows-per-request", "64", "--max-body-mb", "1"]


def strict_json(payload: bytes):
    """json.loads that refuses NaN/Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in a response body")
    return json.loads(payload, parse_constant=refuse)


def http(method, url, body=None, raw=None, timeout=120):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    if "json" in ctype and payload:
        return status, strict_json(payload)
    return status, payload.decode()


def check_generate(obj):
    """Our invariants plus SGLang's own response schema."""
    api = load_sglang_api_types()
    if api is not None:
        api.GenerateResponse.from_json_value(obj)
    meta = obj["meta_info"]
    assert meta["completion_tokens"] == len(obj["output_ids"])
    if "output_token_logprobs" in meta:
        assert [e[1] for e in meta["output_token_logprobs"]] == obj["output_ids"]
        assert meta["output_token_logprobs_length"] == len(obj["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length", "abort")
    return obj


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    a = make_tiny_model_dir(str(base / "a"), seed=0, vocab_size=VOCAB, init_std=0.3, with_tokenizer=True)
    b = make_tiny_model_dir(str(base / "b"), seed=1, vocab_size=VOCAB, init_std=0.3, with_tokenizer=True)
    return a, b


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    log = str(tmp_path_factory.mktemp("server_log") / "server.log")
    sp = launch_server(dirs[0], extra_args=SERVER_ARGS, log_path=log, wait_s=240)
    yield sp
    sp.stop()


def gen(server, body, **kw):
    return http("POST", server.url + "/generate", body, **kw)


def greedy_body(ids, n_new=8, **extra):
    return {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": n_new, "ignore_eos": True},
            **extra}


def test_health_and_info_endpoints(server, dirs):
    api = load_sglang_api_types()
    for path in ("/health", "/ready", "/health_generate"):
        status, body = http("GET", server.url + path)
        assert (status, body) == (200, ""), path
    s1, info = http("GET", server.url + "/model_info")
    s2, info2 = http("GET", server.url + "/get_model_info")
    assert s1 == s2 == 200 and info == info2
    assert info["model_path"] == dirs[0] and info["is_generation"] is True
    assert info["weight_version"] == "default" and info["model_type"] == "qwen2"
    s1, sinfo = http("GET", server.url + "/server_info")
    s2, sinfo2 = http("GET", server.url + "/get_server_info")
    assert s1 == s2 == 200 and sinfo["model_path"] == dirs[0] and sinfo["max_context_length"] == 512
    assert sinfo["port"] == int(server.url.rsplit(":", 1)[1]) and sinfo["skip_tokenizer_init"] is False
    # ours, beyond SGLang's: the sampler's buckets and the programs compiled so far (the warm-up's at least)
    assert (sinfo["batch_buckets"], sinfo["prompt_buckets"], sinfo["gen_buckets"]) == ([16], [32], [16, 256])
    assert isinstance(sinfo["compiled_programs"], int) and sinfo["compiled_programs"] > 0
    # and the CPU its process has used (it has loaded a model and compiled: not nothing), never going back
    assert 0 < sinfo["process_cpu_s"] <= sinfo2["process_cpu_s"]
    if api is not None:
        api.GetModelInfoResponse.from_json_value(info)
        api.GetServerInfoResponse.from_json_value(sinfo)


def test_generate_single_batch_n_and_rid(server):
    status, one = gen(server, {"input_ids": [1, 5, 9], "rid": "r-single", "return_logprob": True,
                               "sampling_params": {"temperature": 1.0, "max_new_tokens": 6, "sampling_seed": 3}})
    assert status == 200 and isinstance(one, dict)
    check_generate(one)
    m = one["meta_info"]
    assert m["id"] == "r-single" and m["prompt_tokens"] == 3 and m["weight_version"] == "default"
    assert m["input_token_logprobs"] == [] and all(len(e) == 3 and e[2] is None for e in m["output_token_logprobs"])
    assert isinstance(one["text"], str)  # the model dir has a tokenizer
    # same seed -> same sample
    assert gen(server, {"input_ids": [1, 5, 9], "sampling_params": {"temperature": 1.0, "max_new_tokens": 6,
                                                                    "sampling_seed": 3}})[1]["output_ids"] == one["output_ids"]
    # batch: an array in input order, per-item sampling params, rid list
    status, batch = gen(server, {"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "rid": ["a", "b"],
                                 "sampling_params": [{"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True},
                                                     {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}]})
    assert status == 200 and [o["meta_info"]["id"] for o in batch] == ["a", "b"]
    assert [o["meta_info"]["completion_tokens"] for o in batch] == [3, 5]
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == [3, 4]
    for o in batch:
        check_generate(o)
    # a string rid on a batch expands to rid_i
    _, batch = gen(server, {"input_ids": [[1, 2], [3, 4]], "rid": "x", "sampling_params": {"max_new_tokens": 1}})
    assert [o["meta_info"]["id"] for o in batch] == ["x_0", "x_1"]
    # n > 1: prompt-major array, distinct samples (seed + j), fresh rids
    status, many = gen(server, {"input_ids": [[1, 2, 3], [7, 8]], "rid": "ignored",
                                "sampling_params": {"n": 3, "max_new_tokens": 6, "temperature": 1.0,
                                                    "sampling_seed": 11, "ignore_eos": True}})
    assert status == 200 and len(many) == 6
    assert [o["meta_info"]["prompt_tokens"] for o in many] == [3, 3, 3, 2, 2, 2]
    assert len({tuple(o["output_ids"]) for o in many[:3]}) == 3
    assert len({o["meta_info"]["id"] for o in many}) == 6
    # a single prompt with n > 1 is an array too
    _, arr = gen(server, {"input_ids": [1, 2], "sampling_params": {"n": 2, "max_new_tokens": 1}})
    assert isinstance(arr, list) and len(arr) == 2


def test_text_in_text_out_and_stop_strings(server, dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dirs[0], local_files_only=True)
    status, out = gen(server, {"text": "hello world", "sampling_params": {"temperature": 0.0, "max_new_tokens": 12,
                                                                          "ignore_eos": True}})
    assert status == 200 and out["meta_info"]["prompt_tokens"] == len(tok.encode("hello world"))
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    # a stop string cuts the output at the token that completes it; text is trimmed before it
    full = out["text"]
    stop = next((full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].strip() and full[i:i + 2] not in full[:i + 1]), None)
    if stop is None:
        pytest.skip(f"greedy text {full!r} has no usable stop string")
    _, cut = gen(server, {"text": "hello world", "sampling_params": {"temperature": 0.0, "max_new_tokens": 12,
                                                                     "ignore_eos": True, "stop": [stop]}})
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert cut["output_ids"] == out["output_ids"][:len(cut["output_ids"])]
    assert stop in tok.decode(cut["output_ids"]) and stop not in tok.decode(cut["output_ids"][:-1])
    assert cut["text"] == full[:full.find(stop)]
    check_generate(cut)


def test_stream_sends_final_chunk_and_done(server):
    req = urllib.request.Request(server.url + "/generate", method="POST",
                                 data=json.dumps({**greedy_body([1, 2, 3], 4), "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    check_generate(last)
    assert last["meta_info"]["completion_tokens"] == 4


BAD = [
    ({"input_ids": [1, 2], "sampling_params": {"seed": 1}}, "unknown field `seed`"),
    ({"input_ids": [1, 2], "sampling_params": {"max_tokens": 4}}, "max_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": "1"}}, "sampling_params.temperature"),
    ({"input_ids": [1, 2.5]}, "input_ids[1]"),
    ({"input_ids": [1, 2], "return_logprob": 1}, "return_logprob"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -0.5}}, "temperature must be a non-negative"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k"),
    ({"input_ids": [1, 2], "sampling_params": {"min_p": 2.0}}, "min_p"),
    ({"input_ids": list(range(1, 200)) * 3}, "longer than the model's context length"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 600}}, "maximum context length"),
    ({"input_ids": []}, "input_ids cannot be empty"),
    ({"input_ids": [[1, 2], []]}, "input_ids[1]"),
    ({"input_ids": [1, VOCAB]}, "outside the vocabulary"),
    ({"sampling_params": {}}, "Either text, input_ids"),
    ({"input_ids": [1], "text": "a"}, "Either text, input_ids"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {}, {}]}, "sampling_params"),
    ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, "Duplicate request IDs"),
    ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 3}, "logprob_start_len"),
    ({"input_ids": [1, 2], "return_logprob": True, "token_ids_logprob": [VOCAB]}, "token_ids_logprob[0]"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_regex": ["a+"]}}, "stop_regex"),
    ([1, 2, 3], "expected struct GenerateRequest"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_400_naming_the_field(server, body, needle):
    status, err = gen(server, body)
    assert status == 400, err
    text = err["error"] if isinstance(err["error"], str) else err["error"]["message"]
    assert needle in text, text


def test_malformed_json_and_server_keeps_serving(server):
    status, err = gen(server, None, raw=b'{"input_ids": [1, 2')
    assert status == 400 and err["object"] == "error" and err["code"] == 400 and "JSON" in err["message"]
    status, ok = gen(server, greedy_body([1, 2, 3], 2))
    assert status == 200 and ok["meta_info"]["completion_tokens"] == 2


def test_concurrent_clients_all_answered_none_mixed_up(server):
    bodies = [{"input_ids": [1 + i, 2 + 2 * i, 3], "rid": f"c{i}", "return_logprob": True,
               "sampling_params": {"temperature": 1.0, "max_new_tokens": 4 + i % 5, "sampling_seed": 100 + i,
                                   "ignore_eos": True}} for i in range(24)]
    results = [None] * len(bodies)

    def worker(i):
        results[i] = gen(server, bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (status, out) in enumerate(results):
        assert status == 200 and out["meta_info"]["id"] == f"c{i}"
        assert out["meta_info"]["completion_tokens"] == 4 + i % 5
        check_generate(out)
    # each answer is exactly what the same request gets alone (seeded): nothing was mixed up
    for i in (0, 7, 23):
        alone = gen(server, bodies[i])[1]
        assert alone["output_ids"] == results[i][1]["output_ids"]
        np.testing.assert_allclose([e[0] for e in alone["meta_info"]["output_token_logprobs"]],
                                   [e[0] for e in results[i][1]["meta_info"]["output_token_logprobs"]], atol=1e-5)


def test_control_endpoints(server):
    status, text = http("POST", server.url + "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed.")
    assert http("GET", server.url + "/flush_cache")[0] == 200
    assert http("POST", server.url + "/abort_request", {"rid": "nothing-like-this"}) == (200, "")
    assert http("POST", server.url + "/abort_request", {"abort_all": "yes"})[0] == 400
    assert http("POST", server.url + "/pause_generation", {"mode": "sideways"})[0] == 400
    # pause: a new /generate waits until /continue_generation
    st, body = http("POST", server.url + "/pause_generation", {"mode": "in_place"})
    assert (st, body) == (200, {"message": "Generation paused successfully.", "status": "ok"})
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", gen(server, greedy_body([1, 2], 2))))
    t.start()
    time.sleep(0.5)
    assert "r" not in box, "a paused server must not answer new generations"
    st, body = http("POST", server.url + "/continue_generation", {})
    assert (st, body) == (200, {"message": "Generation continued successfully.", "status": "ok"})
    t.join(60)
    assert box["r"][0] == 200


def test_abort_running_request(server):
    """A long generation (its bucket compiles first: seconds) is aborted by rid: it answers at
    once with finish_reason abort; the server keeps serving."""
    box = {}
    body = {"input_ids": [[3, 4, 5]] * 2, "rid": ["long-0", "long-1"],
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 250, "ignore_eos": True}}
    t = threading.Thread(target=lambda: box.setdefault("r", gen(server, body)))
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        info = http("GET", server.url + "/server_info")[1]
        if info["internal_states"][0]["num_running_reqs"] >= 2:
            break
        time.sleep(0.02)
    assert http("POST", server.url + "/abort_request", {"rid": "long-"}) == (200, "")
    t.join(60)
    status, outs = box["r"]
    assert status == 200
    for o in outs:
        check_generate(o)
        fr = o["meta_info"]["finish_reason"]
        assert fr["type"] == "abort" and fr["message"] == "Aborted", fr
    assert gen(server, greedy_body([1, 2], 2))[0] == 200


def test_weight_update_changes_outputs_and_version_never_mixes(server, dirs):
    base, other = dirs
    body = {"input_ids": [[1, 2, 3], [9, 8, 7, 6]] * 4, "sampling_params": {"temperature": 0.0, "max_new_tokens": 12,
                                                                            "ignore_eos": True}}
    before = [o["output_ids"] for o in gen(server, body)[1]]
    # a failed update (not a checkpoint) is a 400 with success false; old weights keep serving
    st, res = http("POST", server.url + "/update_weights_from_disk", {"model_path": "/nonexistent", "weight_version": "bad"})
    assert st == 400 and res["success"] is False
    assert http("GET", server.url + "/model_info")[1]["weight_version"] == "default"
    assert http("POST", server.url + "/update_weights_from_disk", {"weight_version": "x"})[0] == 400
    # update while generations are in flight: every response is entirely old or entirely new
    box = {}
    threads = [threading.Thread(target=lambda k=k: box.setdefault(k, gen(server, body))) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    st, res = http("POST", server.url + "/update_weights_from_disk", {"model_path": other, "weight_version": "v1"})
    for t in threads:
        t.join(120)
    assert st == 200 and res == {"success": True, "num_paused_requests": 0,
                                 "message": "Succeeded to update model weights. Weight version updated to v1."}
    info = http("GET", server.url + "/model_info")[1]
    assert info["weight_version"] == "v1" and info["model_path"] == other
    after_resp = gen(server, body)[1]
    after = [o["output_ids"] for o in after_resp]
    assert all(o["meta_info"]["weight_version"] == "v1" for o in after_resp)
    assert after != before
    for k in range(3):
        outs = box[k][1]
        versions = {o["meta_info"]["weight_version"] for o in outs}
        assert len(versions) == 1
        expect = before if versions == {"default"} else after
        assert [o["output_ids"] for o in outs] == expect
    # /update_weight_version renames without reloading
    st, res = http("POST", server.url + "/update_weight_version", {"new_version": "v1b"})
    assert st == 200 and res["new_version"] == "v1b"
    st, res = http("POST", server.url + "/update_weights_from_disk", {"model_path": base, "weight_version": "v2"})
    assert st == 200 and [o["output_ids"] for o in gen(server, body)[1]] == before


def test_unloadable_model_exits_with_the_reason(tmp_path):
    from aepo_jax.rollout.launch import launch_server

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(RuntimeError, match="vocab_size"):
        launch_server(str(bad), wait_s=120, log_path=str(tmp_path / "log"))


# ---------------------------------------------------------------- hostile and odd requests


def test_limits_on_n_rows_and_body_size(server):
    status, err = gen(server, {"input_ids": [1, 2], "sampling_params": {"n": 9, "max_new_tokens": 1}})
    assert status == 400 and "sampling_params.n" in err["error"]["message"] and "--max-n" in err["error"]["message"]
    status, err = gen(server, {"input_ids": [[1, 2]] * 9, "sampling_params": {"n": 8, "max_new_tokens": 1}})
    assert status == 400 and "72 sequences" in err["error"]["message"], err
    status, ok = gen(server, {"input_ids": [[1, 2]] * 8, "sampling_params": {"n": 8, "max_new_tokens": 1}})
    assert status == 200 and len(ok) == 64
    big = json.dumps({"input_ids": [1] * 600_000}).encode()  # 1.8 MB > --max-body-mb 1
    status, err = gen(server, None, raw=big)
    assert status == 413 and isinstance(err, dict) and err["code"] == 413, err
    assert http("GET", server.url + "/health") == (200, "")


def test_deep_nesting_and_non_json_numbers_are_400(server):
    for raw in (b"[" * 20000 + b"]" * 20000, b'{"input_ids": ' + b"[" * 20000 + b"]" * 20000 + b"}",
                b'{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}',
                b'{"input_ids": [1, 2], "sampling_params": {"top_p": Infinity}}'):
        status, err = gen(server, None, raw=raw)
        assert status == 400 and err["object"] == "error" and "JSON" in err["message"], (raw[:40], err)
    status, err = http("POST", server.url + "/update_weights_from_disk", raw=b"[" * 20000)
    assert status == 400 and "JSON" in err["message"]
    status, err = http("POST", server.url + "/no_such_route", {})
    assert status == 404 and err["code"] == 404  # aiohttp's own errors are JSON too
    assert gen(server, greedy_body([1, 2], 1))[0] == 200


def test_unknown_top_level_keys_refused_sglang_neutral_values_accepted(server):
    status, err = gen(server, {**greedy_body([1, 2], 1), "return_logprobs": True})
    assert status == 400 and "return_logprobs" in err["error"]["message"]
    status, err = gen(server, {**greedy_body([1, 2], 1), "lora_path": "adapter"})
    assert status == 400 and "lora_path" in err["error"]["message"]
    # what SGLang's own frontend (sglang.lang, SglSamplingParams.to_srt_kwargs) sends by default
    frontend = {"text": "hello", "sampling_params": {
        "max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [],
        "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0,
        "presence_penalty": 0.0, "ignore_eos": False, "regex": None, "json_schema": None},
        "return_logprob": False, "logprob_start_len": -1, "top_logprobs_num": 0,
        "return_text_in_logprobs": False, "stream": False, "lora_path": None, "image_data": None,
        "log_metrics": True, "routed_experts_start_len": 0, "custom_labels": {"team": "rl"}}
    status, out = gen(server, frontend)
    assert status == 200, out
    check_generate(out)
    status, err = gen(server, {**frontend, "sampling_params": {**frontend["sampling_params"], "stop_regex": ["x+"]}})
    assert status == 400 and "stop_regex" in err["error"]["message"]


def _copy_with_weights(src, dst, change):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(f"{src}/model.safetensors")
    save_file({k: change(k, v) for k, v in tensors.items()}, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_nan_weights_refused_and_overflow_gives_valid_json(server, dirs, tmp_path):
    body = {"input_ids": [[1, 2, 3], [9, 8]], "return_logprob": True,
            "sampling_params": [{"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
                                {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": 5}]}
    before = gen(server, body)[1]
    version = http("GET", server.url + "/model_info")[1]["weight_version"]
    nan = _copy_with_weights(dirs[0], tmp_path / "nan", lambda k, v: v * np.float32(np.nan) if "layers.0.self_attn.o_proj" in k else v)
    st, res = http("POST", server.url + "/update_weights_from_disk", {"model_path": nan, "weight_version": "nan"})
    assert st == 400 and res["success"] is False and "non-finite" in res["message"] and "attn" in res["message"], res
    assert http("GET", server.url + "/model_info")[1]["weight_version"] == version
    assert [o["output_ids"] for o in gen(server, body)[1]] == [o["output_ids"] for o in before]
    # finite weights whose logits overflow (inf - inf = NaN): still strict JSON, ids in the vocabulary
    huge = _copy_with_weights(dirs[0], tmp_path / "huge", lambda k, v: v * np.float32(1e38) if "lm_head" in k else v)
    try:
        st, res = http("POST", server.url + "/update_weights_from_disk", {"model_path": huge, "weight_version": "huge"})
        assert st == 200, res
        status, outs = gen(server, body)  # http() parses with strict_json: a bare NaN would raise
        assert status == 200
        for o in outs:
            check_generate(o)
            assert all(0 <= t < VOCAB for t in o["output_ids"]), o["output_ids"]
    finally:
        http("POST", server.url + "/update_weights_from_disk", {"model_path": dirs[0], "weight_version": version})


@pytest.mark.slow
def test_abandoned_request_is_cancelled(tmp_path):
    """A client that goes away stops its sequences: the next request does not wait for them.
    (A model large enough that one long batch takes seconds, so the wait is measurable.)"""
    from http.client import HTTPConnection
    from urllib.parse import urlparse

    from aepo_jax.rollout.launch import launch_server

    model = make_tiny_model_dir(str(tmp_path / "m"), vocab_size=2048, hidden_size=256, intermediate_size=512,
                                num_layers=4, max_position_embeddings=1024)
    args = ["--max-batch", "16", "--batch-buckets", "16", "--prompt-buckets", "16", "--gen-buckets", "512",
            "--skip-server-warmup"]
    with launch_server(model, extra_args=args, wait_s=240, log_path=str(tmp_path / "log")) as sp:
        long_body = {"input_ids": [[3, 4, 5]] * 16, "sampling_params": {"temperature": 1.0, "max_new_tokens": 500,
                                                                         "ignore_eos": True}}
        assert gen(sp, long_body)[0] == 200  # compiles the one bucket
        t0 = time.time()
        assert gen(sp, long_body)[0] == 200
        full = time.time() - t0
        u = urlparse(sp.url)
        conn = HTTPConnection(u.hostname, u.port, timeout=120)
        conn.request("POST", "/generate", body=json.dumps(long_body), headers={"Content-Type": "application/json"})
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until the batch runs
            if http("GET", sp.url + "/server_info")[1]["internal_states"][0]["num_running_reqs"] >= 16:
                break
            time.sleep(0.01)
        conn.close()  # abandon it
        t1 = time.time()
        assert gen(sp, greedy_body([1, 2], 1))[0] == 200
        waited = time.time() - t1
        assert waited < 0.5 * full, (waited, full)
