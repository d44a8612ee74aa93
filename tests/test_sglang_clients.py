"""SGLang's own clients, unchanged, against ``python -m aepo_jax.rollout.server``: the sglang 0.5.23
frontend (``gen``, ``select``, ``fork``, ``run_batch``) and the ``openai`` package (models, completions,
chat, streamed and not). The log-probs they see equal the learner's (``aepo_jax.logprobs``) on the same
tokens, at SGLang's temperature convention."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request

import numpy as np
import pytest

from aepo_jax.rollout.testing import make_tiny_model_dir

VOCAB = 320
SERVER_ARGS = ["--max-batch", "8", "--batch-buckets", "8", "--prompt-buckets", "64",
               "--gen-buckets", "16", "--random-seed", "0"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def load_sglang_frontend():
    """``sglang.lang`` (the frontend: function, gen, select, RuntimeEndpoint) without running
    ``sglang/__init__``, which imports the whole GPU runtime (torch, triton, ...). With a full
    SGLang install, ``import sglang as sgl`` gives the same objects."""
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang is not installed (pip install --no-deps sglang==0.5.23)")
    if "sglang" not in sys.modules:
        sys.modules["sglang"] = importlib.util.module_from_spec(spec)  # the package, not executed
    from sglang.lang import api
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    return api, RuntimeEndpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    d = make_tiny_model_dir(str(tmp_path_factory.mktemp("clients") / "m"), seed=5, vocab_size=VOCAB,
                            init_std=0.3, with_tokenizer=True)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from aepo_jax.rollout.launch import launch_server

    log = str(tmp_path_factory.mktemp("clients_log") / "server.log")
    sp = launch_server(model_dir, extra_args=SERVER_ARGS, log_path=log, wait_s=240)
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def learner(model_dir):
    from transformers import AutoTokenizer

    from aepo_jax.models import load_pretrained

    return load_pretrained(model_dir, dtype="float32"), AutoTokenizer.from_pretrained(model_dir)


def learner_logprobs(model, prompt, output, temperature=1.0):
    """The learner's log-probs of ``output`` after ``prompt`` (``aepo_jax.logprobs``' head)."""
    import jax.numpy as jnp

    from aepo_jax.logprobs import chunked_logprobs_entropy

    ids = padded(list(prompt) + list(output))
    hidden = model.hidden_states(ids)[:, :-1]
    lp, _ = chunked_logprobs_entropy(hidden, model.lm_head_kernel(), ids[:, 1:], temperature=temperature)
    return np.asarray(lp[0])[len(prompt) - 1:len(prompt) + len(output) - 1]


def padded(ids, length=96):
    """[1, length] right-padded: causal, so the padding changes nothing before it, and one compiled
    forward serves every call."""
    import jax.numpy as jnp

    assert len(ids) <= length
    return jnp.asarray([list(ids) + [0] * (length - len(ids))], jnp.int32)


def native(server, body):
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------- sglang frontend


@pytest.fixture(scope="module")
def frontend(server):
    api, RuntimeEndpoint = load_sglang_frontend()
    return api, RuntimeEndpoint(server.url)


def _check_gen_meta(learner, prompt_text, meta, temperature):
    model, tok = learner
    entries = meta["output_token_logprobs"]
    out = [e[1] for e in entries]
    assert len(out) == meta["completion_tokens"] > 0
    want = learner_logprobs(model, tok.encode(prompt_text), out, temperature if temperature > 0 else 1.0)
    np.testing.assert_allclose([e[0] for e in entries], want, atol=1e-4)
    if temperature == 0:  # greedy: every token is the learner's argmax
        ids = tok.encode(prompt_text) + out
        logits = np.asarray(model(padded(ids))[0])
        assert out == logits[len(ids) - len(out) - 1:len(ids) - 1].argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.8, 1.2, 0.0])
def test_frontend_gen(frontend, learner, temperature):
    sgl, backend = frontend

    @sgl.function
    def qa(s, question):
        s += question
        s += sgl.gen("answer", max_tokens=10, temperature=temperature, return_logprob=True)

    state = qa.run(question="the quick brown fox", backend=backend)
    assert state.text() == "the quick brown fox" + state["answer"]
    _check_gen_meta(learner, "the quick brown fox", state.get_meta_info("answer"), temperature)


def test_frontend_run_batch_at_each_temperature(frontend, learner):
    sgl, backend = frontend

    @sgl.function
    def qa(s, question):
        s += question
        s += sgl.gen("answer", max_tokens=8, return_logprob=True)

    questions = ["hello world", "what is the answer?", "1 + 1 = 2, 2 + 2 ="]
    for t in (0.8, 1.2, 0.0):
        states = qa.run_batch([{"question": q} for q in questions], temperature=t, backend=backend,
                              num_threads=3)
        for q, st in zip(questions, states):
            _check_gen_meta(learner, q, st.get_meta_info("answer"), t)


def test_frontend_fork_and_select(frontend, learner):
    sgl, backend = frontend
    model, tok = learner

    @sgl.function
    def program(s):
        s += "the answer is"
        forks = s.fork(2)
        for f in forks:
            f += sgl.gen("a", max_tokens=6, temperature=0.0)
        forks.join()
        s += sgl.select("pick", choices=[" 42", " fox", " hello world"])

    state = program.run(backend=backend)  # fork + join, then select on the joined state
    assert state["pick"] in (" 42", " fox", " hello world")
    meta = state.get_meta_info("pick")
    prompt = tok.encode("the answer is")
    start = max(len(prompt) - 2, 0)  # the frontend asks from two tokens before the choice (token healing)
    expect = []
    for choice, entries in zip((" 42", " fox", " hello world"), meta["input_token_logprobs"]):
        ids = tok.encode("the answer is" + choice)
        lp = learner_logprobs(model, ids[:start + 1], ids[start + 1:])
        vals = [e[0] for e in entries if e[0] is not None]
        np.testing.assert_allclose(vals[-len(lp):], lp, atol=1e-4)
        expect.append(float(np.mean(lp)))
    np.testing.assert_allclose(meta["normalized_prompt_logprobs"], expect, atol=1e-4)
    assert state["pick"] == (" 42", " fox", " hello world")[int(np.argmax(expect))]


def test_frontend_fork_outputs_are_greedy(frontend, learner):
    sgl, backend = frontend

    @sgl.function
    def program(s):
        s += "hello rollout"
        forks = s.fork(2)
        for f in forks:
            f += sgl.gen("a", max_tokens=6, temperature=0.0, return_logprob=True)
        s["answers"] = [f["a"] for f in forks]
        s["metas"] = [f.get_meta_info("a") for f in forks]

    state = program.run(backend=backend)
    a, b = state["answers"]
    assert a == b
    for meta in state["metas"]:
        _check_gen_meta(learner, "hello rollout", meta, 0.0)


# --------------------------------------------------------------------------- native input logprobs


def test_native_input_logprobs_layout(server, learner):
    model, tok = learner
    prompt = tok.encode("please reason step by step")
    out = native(server, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 1,
                          "top_logprobs_num": 3, "token_ids_logprob": [5, 7], "return_text_in_logprobs": True,
                          "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "sampling_seed": 11}})
    from aepo_jax.rollout.testing import load_sglang_api_types

    load_sglang_api_types().GenerateResponse.from_json_value(out)  # SGLang's own response schema
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [e[1] for e in inp] == prompt[1:] and inp[0][0] is None
    assert [e[2] for e in inp] == [tok.decode([t]) for t in prompt[1:]]
    np.testing.assert_allclose([e[0] for e in inp[1:]], learner_logprobs(model, prompt[:2], prompt[2:]), atol=1e-4)
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(inp)
    assert all(len(r) == 3 for r in meta["input_top_logprobs"][1:])
    assert len(meta["output_top_logprobs"]) == len(out["output_ids"])
    assert [[e[1] for e in r] for r in meta["output_token_ids_logprobs"]] == [[5, 7]] * len(out["output_ids"])
    # output rows at the sampling temperature: the sampled token's entry in the top-k (when there)
    for (lp, t, _), row in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        for v, i, _ in row:
            if i == t:
                assert abs(v - lp) < 1e-4


# --------------------------------------------------------------------------- openai package


@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_openai_models(oai, model_dir):
    models = oai.models.list()
    assert [m.id for m in models.data] == [model_dir]
    assert oai.models.retrieve(model_dir).id == model_dir


def test_openai_completion_matches_native_and_learner(oai, server, learner, model_dir):
    model, tok = learner
    r = oai.completions.create(model=model_dir, prompt="hello world", max_tokens=8, temperature=0.9, seed=7,
                               logprobs=2, n=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == len(tok.encode("hello world"))
    ref = native(server, {"text": "hello world", "return_logprob": True,
                          "sampling_params": {"max_new_tokens": 8, "temperature": 0.9, "sampling_seed": 7, "n": 2}})
    assert r.usage.completion_tokens == sum(o["meta_info"]["completion_tokens"] for o in ref)
    for c, o in zip(r.choices, ref):
        assert c.text == o["text"]
        assert c.finish_reason == o["meta_info"]["finish_reason"]["type"]
        want = learner_logprobs(model, tok.encode("hello world"), o["output_ids"], 0.9)
        np.testing.assert_allclose(c.logprobs.token_logprobs, want, atol=1e-4)
        assert len(c.logprobs.top_logprobs) == len(want) and all(len(d) <= 2 for d in c.logprobs.top_logprobs)

    # echo with logprobs: the prompt's own log-probs (input_token_logprobs) come first, the first is None
    re = oai.completions.create(model=model_dir, prompt="hello world", max_tokens=2, temperature=0.0, logprobs=1,
                                echo=True)
    e, prompt = re.choices[0], tok.encode("hello world")
    assert e.text.startswith("hello world") and e.logprobs.token_logprobs[0] is None
    assert e.logprobs.top_logprobs[0] is None
    assert len(e.logprobs.tokens) == len(prompt) + re.usage.completion_tokens
    np.testing.assert_allclose(e.logprobs.token_logprobs[1:len(prompt)], learner_logprobs(model, prompt[:1], prompt[1:]),
                               atol=1e-4)

    chunks = list(oai.completions.create(model=model_dir, prompt="hello world", max_tokens=8, temperature=0.9,
                                         seed=7, n=2, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in r.choices]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_chat_matches_native_and_learner(oai, server, learner, model_dir):
    model, tok = learner
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the answer?"}]
    prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    r = oai.chat.completions.create(model=model_dir, messages=messages, max_tokens=10, temperature=1.2, seed=3,
                                    logprobs=True, top_logprobs=2)
    ref = native(server, {"input_ids": prompt, "return_logprob": True,
                          "sampling_params": {"max_new_tokens": 10, "temperature": 1.2, "sampling_seed": 3}})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == ref["text"]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref["output_ids"])
    want = learner_logprobs(model, prompt, ref["output_ids"], 1.2)
    np.testing.assert_allclose([t.logprob for t in c.logprobs.content], want, atol=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    # bytes are lossless: together they are the output's text, fragments of characters included
    raw = b"".join(bytes(t.bytes) for t in c.logprobs.content)
    assert raw.decode("utf-8", "replace") == tok.decode(ref["output_ids"], skip_special_tokens=False)

    stream = oai.chat.completions.create(model=model_dir, messages=messages, max_tokens=10, temperature=1.2, seed=3,
                                         stream=True, stream_options={"include_usage": True})
    content, finish, usage = "", None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for d in ch.choices:
            content += d.delta.content or ""
            finish = d.finish_reason or finish
    assert content == ref["text"] and finish == c.finish_reason and usage.total_tokens == r.usage.total_tokens


def test_openai_bad_requests_name_the_field(oai, model_dir):
    import openai

    cases = [
        (lambda: oai.completions.create(model=model_dir, prompt="hi", temperature=-1), "temperature"),
        (lambda: oai.completions.create(model=model_dir, prompt="hi", max_tokens=0), "max_tokens"),
        (lambda: oai.completions.create(model=model_dir, prompt="hi", frequency_penalty=0.5), "frequency_penalty"),
        (lambda: oai.completions.create(model=model_dir, prompt="hi", extra_body={"bogus": 1}), "bogus"),
        (lambda: oai.chat.completions.create(model=model_dir, messages=[]), "messages"),
        (lambda: oai.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "x"}],
                                             top_p=2.0), "top_p"),
        (lambda: oai.chat.completions.create(model=model_dir, messages=[{"role": "robot", "content": "x"}]),
         "messages[0].role"),
        (lambda: oai.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=4000), "max_tokens"),
    ]
    for call, field in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            call()
        body = ei.value.body
        assert ei.value.status_code == 400 and field in json.dumps(body), (field, body)


def test_native_accepts_the_neutral_values_sglang_clients_send():
    """What SglSamplingParams.to_srt_kwargs() and the OpenAI layer send when a feature is off."""
    from aepo_jax.rollout import protocol

    neutral = {"max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [],
               "stop_regex": [], "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
               "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "ignore_eos": False,
               "regex": None, "json_schema": None, "ebnf": None, "logit_bias": None, "custom_params": {},
               "choice": [], "skip_special_tokens": True, "spaces_between_special_tokens": True,
               "no_stop_trim": False, "watermark": None, "beam_width": None, "structural_tag": None}
    body = {"input_ids": [1, 2, 3], "sampling_params": neutral, "return_logprob": False, "logprob_start_len": None,
            "top_logprobs_num": None, "token_ids_logprob": None, "return_text_in_logprobs": None,
            "lora_path": None, "image_data": None, "return_hidden_states": False, "stream": False}
    parsed = protocol.parse_generate(body, vocab_size=VOCAB, context_len=64)
    assert parsed.items[0].request.max_new_tokens == 4
    for key, bad in (("stop_regex", ["x"]), ("custom_params", {"a": 1}), ("logit_bias", {"1": 2.0}),
                     ("min_new_tokens", 2), ("regex", "a+")):
        with pytest.raises(protocol.RequestError) as ei:
            protocol.parse_generate({**body, "sampling_params": {**neutral, key: bad}}, vocab_size=VOCAB,
                                    context_len=64)
        assert key in json.dumps(ei.value.body)


@pytest.mark.slow
def test_original_logprob_env_gives_t1_output_rows(model_dir, learner, tmp_path):
    """SGLANG_RETURN_ORIGINAL_LOGPROB=1: output log-probs (sampled, top-k, token ids, OpenAI chat) at
    T = 1 whatever the sampling temperature; prompt rows are at T = 1 either way."""
    import openai

    from aepo_jax.rollout.launch import launch_server

    model, tok = learner
    with launch_server(model_dir, extra_args=SERVER_ARGS, env={"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"},
                       log_path=str(tmp_path / "server.log"), wait_s=240) as sp:
        prompt = tok.encode("hello server")
        out = native(sp, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 1,
                          "token_ids_logprob": [9],
                          "sampling_params": {"max_new_tokens": 6, "temperature": 1.5, "sampling_seed": 2}})
        meta, ids = out["meta_info"], out["output_ids"]
        want = learner_logprobs(model, prompt, ids, 1.0)
        np.testing.assert_allclose([e[0] for e in meta["output_token_logprobs"]], want, atol=1e-4)
        full = learner_logprobs(model, prompt[:1], prompt[1:] + ids, 1.0)
        np.testing.assert_allclose([e[0] for e in meta["input_token_logprobs"][1:]], full[:len(prompt) - 1], atol=1e-4)
        row9 = [r[0][0] for r in meta["output_token_ids_logprobs"]]
        assert all(r[0][1] == 9 for r in meta["output_token_ids_logprobs"])
        import jax

        logits = np.asarray(model(padded(prompt + ids))[0], np.float64)
        lsm = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        pos = range(len(prompt) - 1, len(prompt) + len(ids) - 1)
        np.testing.assert_allclose(row9, [lsm[p, 9] for p in pos], atol=1e-4)
        np.testing.assert_allclose([r[0][0] for r in meta["output_top_logprobs"]], [lsm[p].max() for p in pos],
                                   atol=1e-4)
        client = openai.OpenAI(base_url=sp.url + "/v1", api_key="unused")
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=1.5, seed=4, logprobs=True)
        chat_prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)
        ref = native(sp, {"input_ids": chat_prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 1.5,
                                                                         "sampling_seed": 4}})
        np.testing.assert_allclose([t.logprob for t in r.choices[0].logprobs.content],
                                   learner_logprobs(model, chat_prompt, ref["output_ids"], 1.0), atol=1e-4)


CHAT_BAD = [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": "1"}, "seed"),
    ({"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}, "continue_final_message"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": None, "presence_penalty": 1.0},
     "presence_penalty"),
]


@pytest.mark.parametrize("body,field", CHAT_BAD, ids=[f for _, f in CHAT_BAD])
def test_chat_validation_names_the_field(learner, body, field):
    from aepo_jax.rollout.openai_requests import OpenAIError, translate_chat

    with pytest.raises(OpenAIError) as ei:
        translate_chat(body, learner[1], 512, {})
    assert ei.value.status == 400 and ei.value.body["param"] == field and field in ei.value.body["message"]
    assert set(ei.value.body) == {"object", "message", "type", "param", "code"}


def test_chat_translation_neutral_values_and_defaults(learner):
    from aepo_jax.rollout.openai_requests import translate_chat

    tok = learner[1]
    body = {"messages": [{"role": "system", "content": "s"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "tools": [], "tool_choice": "none", "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
            "user": "u", "max_tokens": 5, "stop": "x", "seed": 9, "n": 2}
    tr = translate_chat(body, tok, 512, {"temperature": 0.7, "top_k": 20})
    sp = tr.native["sampling_params"]
    assert (sp["temperature"], sp["top_k"], sp["max_new_tokens"], sp["stop"], sp["sampling_seed"], sp["n"]) == \
        (0.7, 20, 5, ["x"], 9, 2)
    text = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}],
                                   tokenize=False, add_generation_prompt=True)
    assert tr.native["input_ids"] == tok.encode(text, add_special_tokens=False)
    # without max_tokens: up to the context length, as SGLang
    body = {"messages": [{"role": "user", "content": "a"}], "temperature": 0.2}
    tr = translate_chat(body, tok, 512, {"temperature": 0.7})
    assert tr.native["sampling_params"]["temperature"] == 0.2
    assert tr.native["sampling_params"]["max_new_tokens"] == 512 - len(tr.native["input_ids"])
