"""The prompt pipeline: seeded epochs, per-process sharding, and exact resume (mid-epoch and at an
epoch boundary) with 1 and 2 simulated JAX processes."""

from __future__ import annotations

import json

import pytest

from aepo_jax.data import Example, PipelineConfig, PromptPipeline


def _examples(n: int) -> list[Example]:
    return [Example(uid=f"u{i}", prompt_ids=(i, i + 1), answer=str(i), source="t", prompt_text=f"p{i}") for i in range(n)]


def _uids(batch):
    return [e.uid for e in batch]


def _stream(pipe, steps):
    return [_uids(next(pipe)) for _ in range(steps)]


def test_epochs_are_seeded_permutations_without_crossing(tmp_path):
    ex = _examples(10)
    pipe = PromptPipeline(ex, PipelineConfig(batch_size=3, seed=7, process_index=0, process_count=1))
    assert pipe.steps_per_epoch == 3
    batches = _stream(pipe, 9)
    for e in range(3):
        epoch = sum(batches[3 * e : 3 * e + 3], [])
        assert len(set(epoch)) == 9  # no repeats inside an epoch; the remainder (1 prompt) is dropped
    assert batches[:3] != batches[3:6]  # each epoch is reshuffled
    again = PromptPipeline(ex, PipelineConfig(batch_size=3, seed=7, process_index=0, process_count=1))
    assert _stream(again, 9) == batches  # deterministic given the seed
    other = PromptPipeline(ex, PipelineConfig(batch_size=3, seed=8, process_index=0, process_count=1))
    assert _stream(other, 3) != batches[:3]


def test_finite_epochs_stop():
    pipe = PromptPipeline(_examples(8), PipelineConfig(batch_size=4, num_epochs=2, process_index=0, process_count=1))
    assert len(list(pipe)) == 4 and pipe.total_steps == 4
    unshuffled = PromptPipeline(_examples(8), PipelineConfig(batch_size=4, shuffle=False, process_index=0, process_count=1))
    assert _uids(next(unshuffled)) == ["u0", "u1", "u2", "u3"]


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("resume_at", [2, 5, 6, 12])  # 3 steps per epoch: 6 and 12 are epoch boundaries
def test_resume_equals_uninterrupted_stream(process_count, resume_at):
    ex = _examples(26)  # 26 // 8 = 3 steps per epoch, 2 prompts dropped per epoch
    total = 15

    def cfg(p):
        return PipelineConfig(batch_size=8, seed=3, process_index=p, process_count=process_count)

    for p in range(process_count):
        reference = _stream(PromptPipeline(ex, cfg(p)), total)
        first = PromptPipeline(ex, cfg(p))
        head = _stream(first, resume_at)
        state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
        resumed = PromptPipeline(ex, cfg(p))
        resumed.set_state(state)
        assert resumed.next_step == resume_at and resumed.epoch == resume_at // 3
        assert head + _stream(resumed, total - resume_at) == reference


def test_process_shards_partition_the_global_batch():
    ex = _examples(40)
    single = PromptPipeline(ex, PipelineConfig(batch_size=8, seed=1, process_index=0, process_count=1))
    shards = [PromptPipeline(ex, PipelineConfig(batch_size=8, seed=1, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(12):  # across epoch boundaries too
        whole = _uids(next(single))
        parts = [_uids(next(s)) for s in shards]
        assert parts[0] + parts[1] == whole and len(parts[0]) == 4
    # A run checkpointed on 2 processes resumes on 1 at the same global step.
    state = shards[0].get_state()
    single2 = PromptPipeline(ex, PipelineConfig(batch_size=8, seed=1, process_index=0, process_count=1))
    single2.set_state(state)
    assert _uids(next(single2)) == _uids(next(single))


def test_bad_configs_and_mismatched_state():
    ex = _examples(10)
    with pytest.raises(ValueError, match="not divisible by the 3 JAX processes"):
        PromptPipeline(ex, PipelineConfig(batch_size=4, process_index=0, process_count=3))
    with pytest.raises(ValueError, match="fewer than one batch"):
        PromptPipeline(ex, PipelineConfig(batch_size=11, process_index=0, process_count=1))
    pipe = PromptPipeline(ex, PipelineConfig(batch_size=2, seed=0, process_index=0, process_count=1))
    state = pipe.get_state()
    other = PromptPipeline(ex, PipelineConfig(batch_size=2, seed=1, process_index=0, process_count=1))
    with pytest.raises(ValueError, match="different data or settings"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a version-1 pipeline state"):
        pipe.set_state({"next_index": 3})


def test_defaults_to_jax_process_layout():
    pipe = PromptPipeline(_examples(4), PipelineConfig(batch_size=2))
    assert (pipe.process_index, pipe.process_count) == (0, 1)
