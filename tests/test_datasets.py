"""Problem files in the layouts RL users have (verl, EasyR1, plain), prompt rendering, and the
promised errors for bad rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aepo_jax.data import DataError, DatasetConfig, Problem, PromptConfig, load_problems, tokenize_problems
from aepo_jax.data.datasets import clean_answer


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_verl_parquet_with_nested_ground_truth_and_chat_prompt(tmp_path):
    rows = [
        {
            "data_source": "gsm8k",
            "prompt": [{"role": "user", "content": f"What is {i}+1? Put the answer in \\boxed{{}}."}],
            "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
            "extra_info": {"index": i},
        }
        for i in range(5)
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems, stats = load_problems(str(path))  # "auto" finds prompt and reward_model.ground_truth
    assert stats.loaded == 5 and stats.skipped == 0
    assert problems[3].answer == "4" and problems[3].source == "gsm8k" and problems[3].uid == "train.parquet:3"
    assert problems[3].messages == [{"role": "user", "content": "What is 3+1? Put the answer in \\boxed{}."}]
    # The same field named explicitly (dotted path) gives the same result.
    explicit, _ = load_problems(path, DatasetConfig(prompt_key="prompt", answer_key="reward_model.ground_truth"))
    assert explicit == problems


def test_easyr1_jsonl_and_custom_keys(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": 4}])
    b = _jsonl(tmp_path / "b.jsonl", [{"q": {"text": "3+3?"}, "gt": ["6"]}])
    problems, _ = load_problems(str(a))
    assert [p.answer for p in problems] == ["2", "4"]  # ints become strings
    custom, _ = load_problems([b], DatasetConfig(prompt_key="q.text", answer_key="gt"))
    assert custom[0].prompt == "3+3?" and custom[0].answer == "6"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 1,072", "1072"),  # GSM8K
        ("so the area is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # MATH solution
        (["3", "\\sqrt{2}"], "3, \\sqrt{2}"),  # OlympiadBench final_answer list
        (["17"], "17"),
        (142.0, "142"),  # AMC answers stored as floats
        (0.25, "0.25"),
        ("$5$", "5"),
        ("  x = 3 ", "x = 3"),
    ],
)
def test_clean_answer_layouts(value, expected):
    assert clean_answer(value) == expected


@pytest.mark.parametrize(
    "row,message",
    [
        ({"answer": "1"}, "no prompt field found in row 0"),  # no known prompt field: file-level error
    ],
)
def test_unknown_layout_names_the_file_and_the_fix(tmp_path, row, message):
    path = _jsonl(tmp_path / "odd.jsonl", [row])
    with pytest.raises(DataError, match=message) as e:
        load_problems(path)
    assert "odd.jsonl" in str(e.value) and "prompt_key" in str(e.value)


BAD_ROWS = [
    ({"prompt": "ok?", "answer": "1"}, None),
    ({"prompt": "no answer here"}, "row 1: field 'answer' is missing"),
    ({"prompt": "", "answer": "1"}, "row 2: field 'prompt' is empty"),
    ({"prompt": 17, "answer": "1"}, "row 3: field 'prompt' has type int"),
    ({"prompt": "x?", "answer": None}, "row 4: field 'answer' is null"),
    ('{"prompt": "broken json", ', "row 5: invalid JSON"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "row 6: field 'prompt' message 0"),
    ({"prompt": "x?", "answer": {"a": 1}}, "row 7: field 'answer' has type dict"),
    ([1, 2], "row 8: row is list"),
    ({"prompt": "last ok", "answer": "2"}, None),
]


@pytest.mark.parametrize("k", [i for i, (_, msg) in enumerate(BAD_ROWS) if msg])
def test_bad_row_error_names_file_row_and_field(tmp_path, k):
    rows = [BAD_ROWS[0][0], BAD_ROWS[k][0]]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    msg = BAD_ROWS[k][1].replace(f"row {k}", "row 1")
    with pytest.raises(DataError) as e:
        load_problems(path)
    assert str(path) in str(e.value) and msg in str(e.value)


def test_skip_bad_rows_counts_and_keeps_the_good_ones(tmp_path, caplog):
    path = _jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_ROWS])
    problems, stats = load_problems(path, DatasetConfig(skip_bad_rows=True))
    assert [p.prompt for p in problems] == ["ok?", "last ok"]
    assert [p.uid for p in problems] == ["bad.jsonl:0", "bad.jsonl:9"]  # row numbers survive skipping
    assert stats.rows == 10 and stats.loaded == 2 and stats.skipped == 8
    assert sum(stats.reasons.values()) == 8
    assert "skipped 8 bad rows" in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_problems(tmp_path / "x.csv")
    (tmp_path / "x.json").write_text('{"train": [{"question": "q", "answer": "1"}]}')
    assert load_problems(tmp_path / "x.json")[0][0].prompt == "q"  # a single wrapped list is fine


# --- prompts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from aepo_jax.data.toy_tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompts_chat_plain_and_length_filter(chat_tokenizer):
    tok = chat_tokenizer
    short = Problem("Start at 3 then a+5 modulo 10 .", "8", "toy", "u0")
    long = Problem("Start at 3 then a+5 b+1 c+1 d+1 e+1 modulo 10 .", "2", "toy", "u1")
    chat, stats = tokenize_problems([short, long], tok, PromptConfig(template="auto"))
    assert stats.kept == 2 and stats.dropped_too_long == 0
    text = chat[0].prompt_text
    assert text.startswith("Start at 3") and "\\boxed{}." in text and text.endswith("Answer:")
    assert list(chat[0].prompt_ids) == tok(text, add_special_tokens=False)["input_ids"]
    plain, _ = tokenize_problems([short], tok, PromptConfig(template="plain", instruction=""))
    assert plain[0].prompt_text == short.prompt
    # Over-long prompts are dropped and counted, never truncated.
    n_short, n_long = len(chat[0].prompt_ids), len(chat[1].prompt_ids)
    kept, stats = tokenize_problems([short, long], tok, PromptConfig(max_prompt_length=n_short))
    assert [e.uid for e in kept] == ["u0"] and stats.dropped_too_long == 1 and n_long > n_short
    with pytest.raises(ValueError, match="template must be one of"):
        PromptConfig(template="jinja")
