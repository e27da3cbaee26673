"""Both batch samplers (fixed size, token budget) are identical on every rank, deterministic and resumable.

The distributed batch samplers: step-aligned fixed-size batches and length-aware token-budget batches,
identical on every rank, deterministic, resumable by step."""

from __future__ import annotations

import itertools

import pytest

from higgs_ddp.data.batching import BatchingError, StepBatchSampler, TokenBudgetBatchSampler
from higgs_ddp.data.dataset import DataError

# ------------------------------------------------------------------------------------------- sampler


def _rank_batches(n, mbs, accum, rank, world, seed=0, shuffle=True, start_step=0, steps=4):
    s = StepBatchSampler(n, mbs, accum, rank, world, seed, shuffle, start_step=start_step)
    return list(itertools.islice(iter(s), accum * steps))


def _step_sets(n, mbs, accum, world, seed=0, shuffle=True, start_step=0, steps=4):
    """For each optimizer step: the sorted samples seen over all ranks and micro-steps, and the count."""
    per_rank = [_rank_batches(n, mbs, accum, r, world, seed, shuffle, start_step, steps) for r in range(world)]
    out = []
    for k in range(steps):
        seen = [i for r in range(world) for mb in per_rank[r][k * accum:(k + 1) * accum] for i in mb]
        out.append(seen)
    return out


def test_micro_batches_have_micro_batch_size():
    for mb in _rank_batches(25, 3, 2, 1, 2, steps=6):
        assert len(mb) == 3
        assert all(isinstance(i, int) for i in mb)


@pytest.mark.parametrize("shuffle", [True, False])
def test_same_samples_per_optimizer_step_across_layouts(shuffle):
    n, steps = 11, 8  # 5 steps per epoch with a block of 2: crosses an epoch boundary
    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (micro_batch_size, grad_accum_steps, world_size)
    results = [_step_sets(n, mbs, accum, world, seed=7, shuffle=shuffle, steps=steps)
               for mbs, accum, world in layouts]
    for k in range(steps):
        sets = [sorted(r[k]) for r in results]
        assert all(len(r[k]) == 2 for r in results)
        assert sets[0] == sets[1] == sets[2], (k, sets)
    # and the steps are not all the same block
    assert len({tuple(sorted(s)) for s in results[0]}) > 1


def test_bigger_layouts_agree():
    # 2 ranks x accum 2 x batch 2 == 1 rank x accum 1 x batch 8 == 4 ranks x accum 1 x batch 2
    a = _step_sets(37, 2, 2, 2, seed=3, steps=6)
    b = _step_sets(37, 8, 1, 1, seed=3, steps=6)
    c = _step_sets(37, 2, 1, 4, seed=3, steps=6)
    for k in range(6):
        assert sorted(a[k]) == sorted(b[k]) == sorted(c[k])


def test_ranks_get_disjoint_slices():
    world = 3
    per_rank = [_rank_batches(30, 2, 2, r, world, steps=5) for r in range(world)]
    for j in range(len(per_rank[0])):
        flat = [i for r in range(world) for i in per_rank[r][j]]
        assert len(flat) == len(set(flat)) == world * 2


def test_deterministic_given_seed():
    a = _rank_batches(20, 2, 2, 0, 2, seed=5, steps=10)
    b = _rank_batches(20, 2, 2, 0, 2, seed=5, steps=10)
    c = _rank_batches(20, 2, 2, 0, 2, seed=6, steps=10)
    assert a == b
    assert a != c


def test_unshuffled_is_arange_order():
    n = 10
    batches = _rank_batches(n, 2, 1, 0, 1, shuffle=False, steps=8)  # 5 steps per epoch
    flat = [i for mb in batches for i in mb]
    assert flat == list(range(n)) + list(range(6))
    # with 2 ranks each rank takes its slice of consecutive samples
    r0 = _rank_batches(n, 1, 1, 0, 2, shuffle=False, steps=3)
    r1 = _rank_batches(n, 1, 1, 1, 2, shuffle=False, steps=3)
    assert r0 == [[0], [2], [4]] and r1 == [[1], [3], [5]]
    # seed has no effect without shuffling
    assert _rank_batches(n, 2, 1, 0, 1, seed=1, shuffle=False) == _rank_batches(n, 2, 1, 0, 1, seed=2, shuffle=False)


def test_shuffled_is_not_arange_order():
    flat = [i for mb in _rank_batches(50, 5, 1, 0, 1, seed=0, steps=10) for i in mb]
    assert sorted(flat) == list(range(50))
    assert flat != list(range(50))


@pytest.mark.parametrize("n, mbs, accum, world", [(10, 2, 1, 1), (11, 1, 2, 2), (23, 2, 2, 2), (7, 3, 1, 1)])
def test_each_epoch_is_a_permutation_with_partial_block_dropped(n, mbs, accum, world):
    block = mbs * accum * world
    per_epoch = n // block
    epochs = 3
    s = StepBatchSampler(n, mbs, accum, 0, world, seed=11, shuffle=True)
    assert len(s) == per_epoch * accum
    steps = _step_sets(n, mbs, accum, world, seed=11, steps=per_epoch * epochs)
    epoch_sets = []
    for e in range(epochs):
        seen = [i for st in steps[e * per_epoch:(e + 1) * per_epoch] for i in st]
        assert len(seen) == len(set(seen)) == per_epoch * block  # nothing repeated, trailing part dropped
        assert set(seen) <= set(range(n))
        epoch_sets.append(seen)
    # epochs are reshuffled: the order differs from one epoch to the next
    assert epoch_sets[0] != epoch_sets[1]


@pytest.mark.parametrize("start", [0, 1, 3, 5, 7, 12])
def test_start_step_resumes_uninterrupted_stream(start):
    n, mbs, accum, world = 13, 2, 2, 2  # block 8, one step per epoch: resuming crosses epochs
    for rank in range(world):
        full = _rank_batches(n, mbs, accum, rank, world, seed=4, steps=start + 6)
        resumed = _rank_batches(n, mbs, accum, rank, world, seed=4, start_step=start, steps=6)
        assert resumed == full[start * accum:]


def test_start_step_resumes_mid_epoch():
    n, mbs, accum, world = 40, 2, 1, 1  # 20 steps per epoch
    full = _rank_batches(n, mbs, accum, 0, world, seed=9, steps=30)
    resumed = _rank_batches(n, mbs, accum, 0, world, seed=9, start_step=17, steps=13)
    assert resumed == full[17:]


def test_iteration_restarts_at_start_step():
    s = StepBatchSampler(10, 2, 1, 0, 1, seed=0, shuffle=True, start_step=2)
    assert list(itertools.islice(iter(s), 4)) == list(itertools.islice(iter(s), 4))


@pytest.mark.parametrize("n, mbs, accum, world, block", [(3, 2, 1, 2, 4), (7, 2, 2, 2, 8), (0, 1, 1, 1, 1)])
def test_too_few_samples_for_one_step(n, mbs, accum, world, block):
    with pytest.raises(DataError) as ei:
        StepBatchSampler(n, mbs, accum, 0, world, seed=0, shuffle=True)
    msg = str(ei.value)
    assert f"data has {n} samples" in msg
    assert f"needs {block}" in msg
    assert f"ranks {world}" in msg and f"grad_accum_steps {accum}" in msg and f"micro_batch_size {mbs}" in msg


def test_exactly_one_block_is_enough():
    s = StepBatchSampler(8, 2, 2, 1, 2, seed=0, shuffle=True)
    assert len(s) == 2
    assert len(list(itertools.islice(iter(s), 6))) == 6


# ---------------------------------------------------------------------------------- token budget


def _lengths(n=200, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.randint(20, 300) for _ in range(n)]


def _budget_batches(lengths, budget, accum, rank, world, seed=0, shuffle=True, start_step=0, steps=10):
    s = TokenBudgetBatchSampler(lengths, budget, accum, rank, world, seed, shuffle, start_step=start_step)
    return list(itertools.islice(iter(s), accum * steps))


def test_budget_respected_and_batches_are_length_sorted():
    lengths = _lengths()
    budget = 1024
    batches = _budget_batches(lengths, budget, 1, 0, 1, steps=60)
    for mb in batches:
        assert max(lengths[i] for i in mb) * len(mb) <= budget
    # similar lengths together: far less padding than random batches of the same sizes would have
    def padding(bs):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for mb in bs) / sum(
            max(lengths[i] for i in mb) * len(mb) for mb in bs)
    flat = [i for mb in batches for i in mb]
    sizes = [len(mb) for mb in batches]
    import random
    shuffled = flat[:]
    random.Random(1).shuffle(shuffled)
    random_batches, k = [], 0
    for size in sizes:
        random_batches.append(shuffled[k:k + size])
        k += size
    assert padding(batches) < 0.1 < padding(random_batches)


def test_budget_epoch_covers_every_sample_once():
    lengths = _lengths(150)
    s = TokenBudgetBatchSampler(lengths, 900, 1, 0, 1, seed=3, shuffle=True)
    plan = s.plan(0)
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(150))
    assert s.plan(1) != plan  # reshuffled per epoch


def test_budget_identical_plan_on_every_rank_and_disjoint_slices():
    lengths = _lengths()
    world, accum = 3, 2
    per_rank = [_budget_batches(lengths, 800, accum, r, world, seed=5, steps=12) for r in range(world)]
    plans = [TokenBudgetBatchSampler(lengths, 800, accum, r, world, 5, True).plan(0) for r in range(world)]
    assert plans[0] == plans[1] == plans[2]
    for j in range(len(per_rank[0])):
        flat = [i for r in range(world) for i in per_rank[r][j]]
        assert len(flat) == len(set(flat))


def test_budget_same_micro_batches_per_step_across_layouts():
    """1 rank x accumulation 2 and 2 ranks x accumulation 1 train on the same micro-batches each step."""
    lengths = _lengths(120, seed=2)
    one = _budget_batches(lengths, 700, 2, 0, 1, seed=9, steps=30)
    two = [_budget_batches(lengths, 700, 1, r, 2, seed=9, steps=30) for r in range(2)]
    for k in range(30):
        assert sorted(map(sorted, one[2 * k:2 * k + 2])) == sorted([sorted(two[0][k]), sorted(two[1][k])])


def test_budget_deterministic_and_seeded():
    lengths = _lengths()
    assert _budget_batches(lengths, 1000, 1, 0, 2, seed=1) == _budget_batches(lengths, 1000, 1, 0, 2, seed=1)
    assert _budget_batches(lengths, 1000, 1, 0, 2, seed=1) != _budget_batches(lengths, 1000, 1, 0, 2, seed=2)


@pytest.mark.parametrize("start", [0, 3, 11, 40])
def test_budget_start_step_resumes_uninterrupted_stream(start):
    lengths = _lengths(60)  # few steps per epoch: resuming crosses epochs of different plan lengths
    for rank in range(2):
        full = _budget_batches(lengths, 1200, 2, rank, 2, seed=4, steps=start + 8)
        resumed = _budget_batches(lengths, 1200, 2, rank, 2, seed=4, start_step=start, steps=8)
        assert resumed == full[start * 2:]


def test_budget_sample_longer_than_budget_is_an_error():
    with pytest.raises(BatchingError, match="needs 300 positions, more than data.max_tokens_per_batch=299"):
        TokenBudgetBatchSampler([10, 300, 20], 299, 1, 0, 1, 0, True)


def test_budget_too_little_data_for_one_step():
    with pytest.raises(DataError, match="packs into 1 micro-batches .* needs 4"):
        TokenBudgetBatchSampler([10, 10, 10], 100, 2, 0, 2, 0, True)


def test_seed_and_epoch_do_not_alias():
    # seed + epoch seeding would make (seed 1, epoch 0) replay (seed 0, epoch 1)
    a = StepBatchSampler(30, 3, 1, 0, 1, seed=0, shuffle=True).plan(1)
    b = StepBatchSampler(30, 3, 1, 0, 1, seed=1, shuffle=True).plan(0)
    assert a != b


# ------------------------------------------------------------------------ resuming on another layout


def _global_stream(make, accum, world, steps, resume=None) -> list:
    """The micro-batches of ``steps`` optimizer steps over all ranks, in the order of the global plan."""
    per_rank = []
    for rank in range(world):
        s = make(accum, rank, world)
        if resume:
            s.resume_at(*resume)
        per_rank.append(list(itertools.islice(iter(s), accum * steps)))
    return [per_rank[r][k * accum + i] for k in range(steps) for i in range(accum) for r in range(world)]


def _continued(plan, epoch: int, micro: int, per_step: int, count: int) -> list:
    """What comes after micro-batch ``micro`` of ``epoch``: whole steps of each epoch's plan, in order."""
    out = []
    while len(out) < count:
        p = plan(epoch)
        out += p[micro:micro + (len(p) - micro) // per_step * per_step]
        epoch, micro = epoch + 1, 0
    return out[:count]


@pytest.mark.parametrize("old,new", [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((2, 2), (3, 1)), ((1, 2), (2, 3))],
                         ids=["2to1", "1to2", "2x2to3", "1x2to2x3"])
@pytest.mark.parametrize("kind", ["fixed", "budget"])
def test_another_layout_resumes_at_the_same_micro_batch(old, new, kind):
    """Ranks x accumulation changed (accepted by train.resume_accept): the new layout continues the same
    micro-batch sequence where the old one stopped, so no sample is replayed or skipped."""
    lengths = _lengths(90, seed=3)
    if kind == "fixed":
        def make(accum, rank, world):
            return StepBatchSampler(45, 2, accum, rank, world, seed=5, shuffle=True)
    else:
        def make(accum, rank, world):
            return TokenBudgetBatchSampler(lengths, 900, accum, rank, world, seed=5, shuffle=True)
    (a0, w0), (a1, w1) = (old[1], old[0]), (new[1], new[0])
    steps = 7
    before = _global_stream(make, a0, w0, steps)
    epoch, micro = make(a0, 0, w0).position(steps)
    after = _global_stream(make, a1, w1, 25, resume=(steps, epoch, micro))
    plan = make(1, 0, 1).plan
    assert before == _continued(plan, 0, 0, a0 * w0, len(before))
    assert after == _continued(plan, epoch, micro, a1 * w1, len(after))
    # Positions keep counting from the resume point, and a second resume from them continues the stream.
    s = make(a1, 0, w1)
    s.resume_at(steps, epoch, micro)
    later = s.position(steps + 10)
    again = _global_stream(make, a1, w1, 15, resume=(steps + 10, *later))
    assert again == after[10 * a1 * w1:]


def test_position_is_epoch_and_micro_batches_into_it():
    s = StepBatchSampler(40, 2, 2, 0, 2, seed=0, shuffle=True)  # 20 micro-batches, 5 steps of 4 per epoch
    assert [s.position(k) for k in (0, 3, 5, 7)] == [(0, 0), (0, 12), (1, 0), (1, 8)]


# ------------------------------------------------------- the plans as arrays (issue 31) = the per-clip plans


def _per_clip_step_plan(n, mbs, seed, epoch, shuffle):
    """StepBatchSampler.plan as it was written before the plans became arrays: the reference."""
    import torch

    from higgs_ddp.data.batching import epoch_generator

    order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    return [order[i:i + mbs].tolist() for i in range(0, (n // mbs) * mbs, mbs)]


def _per_clip_budget_plan(lengths, max_tokens, window, seed, epoch, shuffle):
    """TokenBudgetBatchSampler.plan as it was written before (Python lists, one sample at a time)."""
    import torch

    from higgs_ddp.data.batching import epoch_generator

    g = epoch_generator(seed, epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    batches = []
    for start in range(0, n, window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        current, longest = [], 0
        for i in chunk:
            if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, lengths[i])
        if current:
            batches.append(current)
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
def test_array_plans_equal_the_per_clip_plans(shuffle):
    import numpy as np

    for n, mbs, seed in ((37, 4, 0), (200, 3, 7), (1000, 8, 2)):
        s = StepBatchSampler(n, mbs, 1, 0, 1, seed, shuffle)
        for epoch in range(3):
            assert list(s.plan(epoch)) == _per_clip_step_plan(n, mbs, seed, epoch, shuffle)
    for n, budget, seed, lo, hi in ((300, 900, 1, 20, 300), (3000, 700, 4, 5, 40), (500, 400, 9, 30, 31)):
        lengths = _lengths(n, seed)
        lengths = [lo + x % (hi - lo) for x in lengths]  # ties (few distinct lengths) and many per batch
        s = TokenBudgetBatchSampler(np.asarray(lengths), budget, 1, 0, 1, seed, shuffle)
        assert s.window == max(1, s.WINDOW_BATCHES * (budget // sorted(lengths)[n // 2]))
        s.window = min(s.window, n // 3 + 1)  # several windows, so window edges are tested too
        for epoch in range(3):
            s._cache = {}
            assert list(s.plan(epoch)) == _per_clip_budget_plan(lengths, budget, s.window, seed, epoch, shuffle)
