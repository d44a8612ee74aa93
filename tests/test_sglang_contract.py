"""Our requests and responses against SGLang 0.5.23's own schema (torch-free).

``sglang/api/v1/api_types.py`` (msgspec only) is the contract the real server applies to every
``/generate`` body; it is loaded by file path so ``sglang/__init__`` never runs. Control bodies
that the contract does not cover are checked against the field names of SGLang's
``io_struct.py`` request structs, read with ``ast`` (importing it needs torch).

Live server responses are validated the same way in test_server.py and test_client.py."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest

from _source_ast import parse_file

from aepo_jax.rollout import protocol, responses
from aepo_jax.rollout.testing import load_sglang_api_types

pytest.importorskip("msgspec")
api = load_sglang_api_types()
if api is None:
    pytest.skip("sglang==0.5.23 is not installed (pip install --no-deps sglang==0.5.23)", allow_module_level=True)


def _struct_fields(class_name: str) -> set[str]:
    """Field names of a struct in sglang/srt/managers/io_struct.py (plus BaseReq's)."""
    d = list(importlib.util.find_spec("sglang").submodule_search_locations)[0]
    tree = parse_file(os.path.join(d, "srt", "managers", "io_struct.py"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name):
        node = classes[name]
        out = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
        for b in node.bases:
            if isinstance(b, ast.Name) and b.id in classes:
                out |= fields(b.id)
        return out

    return fields(class_name)


def _client():
    from aepo_jax.rollout.client import RolloutClient

    return RolloutClient(["http://127.0.0.1:1", "http://127.0.0.1:2"], batch_size=5)


@pytest.mark.parametrize("kw", [
    dict(n=1),
    dict(n=4, seed=3, temperature=0.7),
    dict(n=2, seeds=[[1, 2], [3, 4], [5, 6]], sampling_params={"max_new_tokens": 64, "top_p": 0.9, "top_k": 20,
                                                               "min_p": 0.05, "stop_token_ids": [2, 3],
                                                               "ignore_eos": False, "no_stop_trim": True}),
    dict(n=3, return_logprob=False, sampling_params={"stop": ["\n\n"], "skip_special_tokens": False}),
])
def test_every_client_generate_body_passes_the_contract(kw):
    bodies = _client().build_generate_bodies([[1, 2, 3], [4, 5], [6]], **kw)
    rows = 0
    for rows_of_body, body in bodies:
        req = api.GenerateRequest.from_json_value(body)
        assert isinstance(req.input_ids[0], list) and len(req.input_ids) == len(rows_of_body)
        assert len(req.sampling_params) == len(rows_of_body) and len(set(req.rid)) == len(rows_of_body)
        for sp in body["sampling_params"]:
            api.SamplingParams.from_json_value(sp)
            assert "n" not in sp  # one row per sample: SGLang's n would share one seed
        rows += len(rows_of_body)
        # and our own server's parser accepts it
        protocol.parse_generate(body, vocab_size=100, context_len=512, tokenize=lambda t: [1])
    assert rows == 3 * kw["n"]


def test_client_control_bodies_use_sglang_field_names():
    import json

    upd = {"model_path": "/x", "weight_version": "3", "flush_cache": True, "abort_all_requests": False}
    assert set(upd) <= _struct_fields("UpdateWeightFromDiskReqInput")
    assert {"mode"} <= _struct_fields("PauseGenerationReqInput")
    api.AbortRequest.from_json_value({"abort_all": True})
    assert {"abort_all", "rid"} <= _struct_fields("AbortReq")
    # the client builds exactly these bodies (read from its source: no HTTP needed)
    import inspect

    from aepo_jax.rollout import client

    src = inspect.getsource(client.RolloutClient.update_weights_from_disk)
    for k in upd:
        assert json.dumps(k) in src


CONTRACT_CASES = [
    {"input_ids": [1, 2], "sampling_params": {"seed": 1}},
    {"input_ids": [1, 2], "sampling_params": {"max_tokens": 4}},
    {"input_ids": [1, 2], "sampling_params": {"temperature": "1"}},
    {"input_ids": [1, 2], "sampling_params": [{"top_p": True}]},
    {"input_ids": [1, 2.0]},
    {"input_ids": [[1, 2], [3, "4"]]},
    {"input_ids": "1 2"},
    {"input_ids": [1, 2], "return_logprob": 1},
    {"input_ids": [1, 2], "rid": 5},
    {"input_ids": [1, 2], "stream": "no"},
    {"input_ids": [1, 2], "sampling_params": {"stop_token_ids": [1.5]}},
    {"input_ids": [1, 2], "sampling_params": {"ignore_eos": 0}},
    {"input_ids": [1, 2], "sampling_params": 3},
    {"text": 7},
    [1, 2],
    # accepted by the contract (semantic checks may still refuse some)
    {"input_ids": [1, 2]},
    {"input_ids": [1, 2], "unknown_top_level_key": 1},
    {"input_ids": [1, 2], "sampling_params": {"temperature": None, "top_k": None, "max_new_tokens": 3}},
    {"input_ids": [[1], [2]], "sampling_params": [{"temperature": 0}, {"temperature": 2}], "rid": ["a", "b"]},
    {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -3}},
    {"input_ids": []},
    {"input_ids": [1, 2], "sampling_params": {"top_p": 0}},
    {"text": "hi", "sampling_params": {"stop": "x", "n": 2}},
]


@pytest.mark.parametrize("body", CONTRACT_CASES, ids=[str(i) for i in range(len(CONTRACT_CASES))])
def test_server_validation_agrees_with_the_contract(body):
    """The contract rejects a body <=> our server answers with a contract-shaped 400 whose text
    is SGLang's own (prefixed with the field path)."""
    try:
        api.GenerateRequest.from_json_value(body)
        contract_error = None
    except api.JsonContractError as e:
        contract_error = str(e)
    try:
        protocol.parse_generate(body, vocab_size=100, context_len=512, tokenize=lambda t: [1, 2])
        ours = None
    except protocol.RequestError as e:
        ours = e
    if contract_error is not None:
        assert ours is not None and ours.status == 400 and isinstance(ours.body["error"], str), ours
        assert ours.body["error"].endswith(contract_error), (ours.body, contract_error)
    elif ours is not None:  # a semantic refusal: SGLang's _create_error_response shape
        assert ours.status == 400 and isinstance(ours.body["error"], dict) and ours.body["error"]["message"]


def _item(**kw):
    return protocol.GenerateItem(rid="r1", request=protocol.SamplingRequest(input_ids=(1, 2, 3), seed=1),
                                 output=protocol.OutputOptions(**kw))


def _decode_letters(ids, skip_special):
    """A stand-in tokenizer decode: token t is the letter chr(ord('a') + t % 26)."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("case", ["logprob", "plain", "text", "abort", "stop_str", "empty", "prompt_ids"])
def test_built_responses_decode_with_sglang_types(case):
    fr = {"logprob": {"type": "length", "length": 3}, "plain": {"type": "stop", "matched": 2},
          "text": {"type": "stop", "matched": 2}, "abort": responses.finish_abort("Aborted"),
          "stop_str": {"type": "length", "length": 3}, "empty": {"type": "length", "length": 0},
          "prompt_ids": {"type": "length", "length": 3}}[case]
    ids = [] if case in ("abort", "empty") else [5, 6, 2]
    item = _item(return_logprob=case in ("logprob", "text"), return_text_in_logprobs=case == "text",
                 return_prompt_token_ids=case == "prompt_ids", stop=("g",) if case == "stop_str" else ())
    obj = responses.build_response(item, output_ids=ids, finish_reason=fr, logprobs=[-0.5] * len(ids),
                                   weight_version="7", e2e_latency=0.1, now=1.0,
                                   decode=_decode_letters if case in ("text", "stop_str") else None)
    resp = api.GenerateResponse.from_json_value(obj)
    m = resp.meta_info
    n_out = 2 if case == "stop_str" else len(ids)  # "fgc": the stop string "g" ends the output at token 2
    assert m.id == "r1" and m.weight_version == "7" and m.completion_tokens == n_out and m.prompt_tokens == 3
    kind = obj["meta_info"]["finish_reason"]["type"]
    want = {"stop": api.FinishStop, "length": api.FinishLength, "abort": api.FinishAbort}[kind]
    assert isinstance(m.finish_reason, want)  # not the contract's untyped-dict fallback
    if item.output.return_logprob:
        assert [e.token_id for e in m.output_token_logprobs] == ids
        assert m.output_token_logprobs_length == len(ids)
    if case == "text":
        assert [e.text for e in m.output_token_logprobs] == ["f", "g", "c"]
        assert obj["text"] == "fg"  # the matched stop token is trimmed from the text
    if case == "stop_str":
        assert obj["meta_info"]["finish_reason"] == {"type": "stop", "matched": "g"} and obj["text"] == "f"
    if case == "prompt_ids":
        assert resp.prompt_token_ids == [1, 2, 3]
    assert ("text" in obj) == (case in ("text", "stop_str"))


def test_sampling_keys_match_the_contract():
    assert protocol.SAMPLING_PARAM_KEYS == api._FIELDS_SamplingParams
    defaults = api.SamplingParams()
    req = protocol.parse_generate({"input_ids": [1]}, vocab_size=10, context_len=512).items[0].request
    assert (req.max_new_tokens, req.temperature, req.top_p, req.min_p) == (
        defaults.max_new_tokens, defaults.temperature, defaults.top_p, defaults.min_p)
    assert req.top_k == -1 and defaults.top_k == protocol.TOP_K_ALL  # both: the whole vocabulary


def test_accepted_top_level_keys_are_sglangs_generate_req_input_fields():
    """SGLang's own clients only send GenerateReqInput fields; we accept exactly those."""
    assert protocol.GENERATE_REQ_INPUT_FIELDS == _struct_fields("GenerateReqInput")
    assert set(api.GenerateRequest.__struct_fields__) <= protocol.GENERATE_REQ_INPUT_FIELDS
    with pytest.raises(protocol.RequestError, match="return_logprobs"):
        protocol.parse_generate({"input_ids": [1], "return_logprobs": True}, vocab_size=10, context_len=512)


@pytest.mark.parametrize("key,value", [("stop_regex", []), ("stop_regex", None), ("regex", None), ("min_new_tokens", 0),
                                       ("frequency_penalty", 0.0), ("logit_bias", {}), ("choice", []), ("stop", [])])
def test_neutral_values_of_unsupported_sampling_keys_are_accepted(key, value):
    body = {"input_ids": [1, 2], "sampling_params": {key: value}}
    api.GenerateRequest.from_json_value(body)
    protocol.parse_generate(body, vocab_size=10, context_len=512)


def test_limits_on_n_and_rows():
    limits = protocol.Limits(max_n=4, max_rows=6)
    ok = protocol.parse_generate({"input_ids": [[1], [2], [3]], "sampling_params": {"n": 2}},
                                 vocab_size=10, context_len=512, limits=limits)
    assert len(ok.items) == 6
    for body, word in (({"input_ids": [1], "sampling_params": {"n": 5}}, "sampling_params.n"),
                       ({"input_ids": [[1]] * 7}, "7 sequences")):
        with pytest.raises(protocol.RequestError, match=word.replace(".", r"\.")) as e:
            protocol.parse_generate(body, vocab_size=10, context_len=512, limits=limits)
        assert e.value.status == 400
