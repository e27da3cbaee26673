"""DPO training (train.objective=dpo): the loss at the start, by hand, on resume, and bad pairs before training.

At the start the policy is the reference (a new LoRA adapter adds exactly zero; in train.mode=full the reference
is a frozen copy of the starting weights, which an update leaves alone), so the loss is log 2 and the implicit
rewards 0. With the adapter moved, the loss and its gradient equal a computation written out here from
the model's logits (no dual_loss, no dpo_loss). A run resumed from its half-way checkpoint ends with the
uninterrupted run's weights and logged rows. A rejected candidate cut at the generation limit has no end target
(stream EOS, text after its audio), and its log-probability is the hand computation less those terms. A token
budget (data.max_tokens_per_batch) packs whole pairs, and micro-batches of unequal pair counts give the gradient
of the same pairs in one batch. A pairs file with a damaged shard stops `higgs-ddp train` with one
line naming the file and line, before a step (under --nproc-per-node before torchrun starts a rank). train.init_from: the reference is the earlier fine-tune, and a
supervised run continues from it too."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (PLAIN, RESUME_RUN, assert_same_weights, dpo_overrides, final_weights, read_metrics, tiny_config,
                     write_tiny_pairs)

from higgs_ddp.cli import main as cli
from higgs_ddp.data.batching import TokenBudgetBatchSampler
from higgs_ddp.data.dataset import DataError
from higgs_ddp.data.pair_data import load_preference_data
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.model import HiggsForward, _import_higgs
from higgs_ddp.train import main, starting_base, train
from higgs_ddp.training.trainer import Trainer

BETA = 0.5


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A DPO trainer on pairs that clone a reference (context audio), 2 pairs (4 sequences) a micro-batch; the
    second prompt's rejected candidate was cut at the generation limit."""
    tmp = tmp_path_factory.mktemp("dpo")
    pairs = write_tiny_pairs(tmp / "prefs", prompts=4, reference=True, cut=(1,))
    cfg = tiny_config(tmp, *dpo_overrides(pairs, f"dpo.beta={BETA}", "train.micro_batch_size=2", *PLAIN),
                      samples=2)
    return Trainer(cfg, DistEnv())


def test_at_the_start_the_loss_is_log_2_and_the_rewards_0(trainer):
    b = next(iter(trainer.loader))
    assert b.pairs == 2 and b.num_samples == 4
    obj = trainer.preference
    reference = obj.reference_logps(b, check=True)
    trainer.alignment = reference.path
    policy = obj.logps(trainer.wrapped, b, check=False)
    assert torch.equal(policy.logps.detach(), reference.logps)  # bit for bit: the new adapter adds exactly 0
    assert torch.equal(reference.tokens, b.sample_targets)  # the collator's counts, known before the forward
    dl = obj.loss(policy, reference.logps, b.pairs)
    assert dl.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert dl.chosen_rewards.tolist() == dl.rejected_rewards.tolist() == [0.0, 0.0]


def test_in_full_mode_the_reference_is_a_frozen_copy_of_the_starting_weights(tmp_path):
    """train.mode=full (audio_ffn is built the same way), with the deferred text head: policy == reference bit for
    bit at the start; after an update the reference computes what it did, and none of it is trained."""
    pairs = write_tiny_pairs(tmp_path / "prefs", prompts=4, reference=True)
    cfg = tiny_config(tmp_path, *dpo_overrides(pairs, "train.mode=full", f"dpo.beta={BETA}",
                                               "train.micro_batch_size=2", "train.lr=1e-2", "train.warmup_steps=0"),
                      samples=2)
    trainer = Trainer(cfg, DistEnv())
    assert "reference: the base model (a frozen copy)" in trainer.run_card()
    b = next(iter(trainer.loader))
    obj = trainer.preference
    reference = obj.reference_logps(b, check=True)
    trainer.alignment = reference.path
    policy = obj.logps(trainer.wrapped, b, check=False)
    assert torch.equal(policy.logps.detach(), reference.logps)
    dl = obj.loss(policy, reference.logps, b.pairs)
    assert dl.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert dl.chosen_rewards.tolist() == dl.rejected_rewards.tolist() == [0.0, 0.0]

    trained = {id(p) for p in trainer.params}
    frozen = list(trainer.reference.module.parameters())
    assert len(frozen) == len(trainer.params) and not any(p.requires_grad or id(p) in trained for p in frozen)
    step = trainer.train_step([b])
    assert step.loss == pytest.approx(math.log(2), abs=1e-7) and not step.skipped
    assert torch.equal(obj.reference_logps(b).logps, reference.logps)  # the update left the copy alone
    moved = obj.logps(trainer.wrapped, b, check=False).logps.detach()
    assert (moved - reference.logps).abs().max() > 1e-2  # the policy did move


def test_the_copy_shares_the_weights_the_policy_does_not_train(tmp_path):
    """audio_ffn: only the audio FFN is copied (equal values, other tensors); under FSDP (share_frozen=False) every
    weight is the copy's own, for its own sharding."""
    from higgs_ddp.model import build_for_training, load_tokenizer
    from higgs_ddp.training.preference import starting_copy

    cfg = tiny_config(tmp_path, "train.mode=audio_ffn", samples=2)
    raw = build_for_training(cfg, load_tokenizer(cfg), torch.float32)
    names, trained = {n for n, _ in raw.named_parameters()}, {n for n, p in raw.named_parameters() if p.requires_grad}
    assert 0 < len(trained) < len(names)
    for share in (True, False):
        pairs = list(zip(raw.named_parameters(), starting_copy(raw, share_frozen=share).named_parameters()))
        assert [n for (n, _), _ in pairs] == [n for _, (n, _) in pairs]
        assert all(torch.equal(p, q) for (_, p), (_, q) in pairs)
        copied = {n for (n, p), (_, q) in pairs if p is not q}
        assert copied == (trained if share else names)


def hand_logps(out: dict, b) -> torch.Tensor:
    """Each sequence's summed log-probability of its supervised targets, position by position: text label t+1
    from logits t, audio column j+1 of a segment from audio logits j (every codebook), the stream EOS included."""
    logits, labels = F.log_softmax(out["logits"].float(), -1), out["expanded_labels"]
    rows = [logits.new_zeros(()) for _ in range(logits.shape[0])]
    for i in range(logits.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[i, t + 1] != -100:
                rows[i] = rows[i] + logits[i, t, labels[i, t + 1]]
    audio = F.log_softmax(out["audio_logits"].float(), -1)  # (N, C, K)
    n = audio.shape[0]
    starts = b.audio_out_ids_start.tolist() + [n]
    for s, row in enumerate(b.audio_out_ids_start_group_loc.tolist()):
        for j in range(starts[s], starts[s + 1] - 1):
            for c in range(audio.shape[1]):
                y = int(b.label_audio_ids[c, j + 1])
                if y != -100:
                    rows[row] = rows[row] + audio[j, c, y]
    return torch.stack(rows)


def test_loss_and_gradient_equal_a_hand_computation_from_the_logits(trainer):
    b = next(iter(trainer.loader))
    obj, P = trainer.preference, b.pairs
    lora_b = [p for n, p in trainer.named_params if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():  # the policy moved away from the reference
            gen = torch.Generator().manual_seed(0)
            for p in lora_b:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        reference = obj.reference_logps(b, check=True)
        trainer.alignment = reference.path
        policy = obj.logps(trainer.wrapped, b, check=False)
        dl = obj.loss(policy, reference.logps, P)
        loss = dl.normalized(P)
        grads = torch.autograd.grad(loss, [p for _, p in trainer.named_params])

        with torch.no_grad(), trainer.model.disable_adapter():
            ref_by_hand = hand_logps(trainer.wrapped(**b.model_inputs()), b)
        pol_by_hand = hand_logps(trainer.wrapped(**b.model_inputs()), b)
        margin = (pol_by_hand[:P] - ref_by_hand[:P]) - (pol_by_hand[P:] - ref_by_hand[P:])
        by_hand = torch.stack([-F.logsigmoid(BETA * m) for m in margin]).mean()
        hand_grads = torch.autograd.grad(by_hand, [p for _, p in trainer.named_params])
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)
    assert abs(float(by_hand.detach()) - math.log(2)) > 1e-2  # not the trivial point
    # (fp32 sums of a few hundred log-probabilities in another order: ~1e-5 relative apart)
    torch.testing.assert_close(policy.logps.detach(), pol_by_hand.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.detach(), by_hand.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dl.chosen_rewards, BETA * (pol_by_hand[:P] - ref_by_hand[:P]).detach(),
                               rtol=1e-4, atol=1e-5)
    moved = 0
    for (name, _), g, h in zip(trainer.named_params, grads, hand_grads):
        torch.testing.assert_close(g, h, rtol=1e-3, atol=1e-6, msg=name)
        moved += int(bool(g.abs().max() > 0))
    assert moved > len(grads) // 2  # the gradient reaches the adapter


def test_a_cut_candidate_has_no_end_targets(trainer):
    records = trainer.dataset.records
    cut = next(r for r in records if r.stopped == (True, False))
    assert cut.id.endswith("(rejected cut)") and sum(r.stopped != (True, True) for r in records) == 1
    other = next(r for r in records if r.stopped == (True, True))
    whole = dataclasses.replace(cut, stopped=(True, True))
    b_cut, b_whole = (trainer.collator([x.sample(), other.sample()]) for x in (cut, whole))
    row = 2  # rows: the 2 chosen candidates, then the cut pair's rejected one
    C, eos = b_whole.label_audio_ids.shape[0], trainer.raw.config.audio_stream_eos_id

    audio = b_cut.label_audio_ids != b_whole.label_audio_ids  # exactly one stream EOS per codebook left out
    assert int(audio.sum()) == C and bool((audio.sum(1) == 1).all())
    assert set(b_whole.label_audio_ids[audio].tolist()) == {eos} and set(b_cut.label_audio_ids[audio].tolist()) == {-100}
    columns = audio.nonzero()[:, 1]
    starts = b_cut.audio_out_ids_start.tolist()
    segment = max(s for s in range(len(starts)) if starts[s] <= int(columns.min()))
    assert b_cut.audio_out_ids_start_group_loc[segment] == row  # the rejected candidate's own segment
    text = b_cut.label_ids != b_whole.label_ids  # and the text after its audio: <|audio_eos|>, <|eot_id|>
    assert text.nonzero()[:, 0].unique().tolist() == [row]
    assert trainer.tokenizer.convert_ids_to_tokens(b_whole.label_ids[text].tolist()) == ["<|audio_eos|>", "<|eot_id|>"]
    assert (b_cut.label_ids[row] >= 0).sum() == 1  # only <|audio_out_bos|> is left of its text targets
    assert b_cut.sample_targets.tolist() == (b_whole.sample_targets - torch.tensor([0, 0, C + 2, 0])).tolist()

    with torch.no_grad():
        out = trainer.wrapped(**b_whole.model_inputs())
        logps = trainer.preference.logps(trainer.wrapped, b_cut, check=True)
        expanded = trainer.wrapped(**b_cut.model_inputs())["expanded_labels"]
    assert not set(expanded[row].tolist()) & set(b_whole.label_ids[text].tolist())
    by_hand = hand_logps(out, b_whole)
    # the end targets' own terms, by hand: each codebook's EOS from the column before it, and the text targets
    audio_lp = F.log_softmax(out["audio_logits"].float(), -1)
    ends = sum(audio_lp[int(j) - 1, c, eos] for c, j in audio.nonzero().tolist())
    labels, text_lp = out["expanded_labels"][row], F.log_softmax(out["logits"][row].float(), -1)
    dropped = set(b_whole.label_ids[text].tolist())
    ends = ends + sum(text_lp[t - 1, labels[t]] for t in range(1, labels.shape[0]) if int(labels[t]) in dropped)
    expected = by_hand.clone()
    expected[row] -= ends
    torch.testing.assert_close(logps.logps, expected, rtol=1e-5, atol=1e-4)
    assert logps.tokens.tolist() == b_cut.sample_targets.tolist()


def test_a_token_budget_packs_whole_pairs_and_the_loss_is_by_the_global_pair_count(trainer):
    lengths = trainer.dataset.lengths
    budget = 3 * int(lengths.max())  # the longest pair and two more, then what is left: unequal micro-batches
    plan = [list(mb) for mb in TokenBudgetBatchSampler(lengths, budget, 1, 0, 1, seed=0, shuffle=True).plan(0)]
    assert sorted(i for mb in plan for i in mb) == list(range(len(trainer.dataset)))  # every pair once, whole
    for mb in plan:
        b = trainer.collator([trainer.dataset[i] for i in mb])
        P = len(mb)
        # a pair's cost is what its two sequences take padded: the budget holds for what the model computes
        assert b.pairs == P and b.num_samples == 2 * P and b.padded_positions == max(lengths[mb]) * P <= budget
        assert torch.equal(b.input_ids[:P], b.input_ids[P:])  # row i and P + i: one pair's prompt
    small, large = min(plan, key=len), max(plan, key=len)
    assert len(small) < len(large)  # else the normalisation below is not tested

    obj = trainer.preference

    def step(micro):
        trainer.model.zero_grad(set_to_none=True)
        loss, row = obj.accumulate([trainer.collator([trainer.dataset[i] for i in mb]) for mb in micro])
        return loss, row, [p.grad.clone() for _, p in trainer.named_params]

    obj.sft_weight = 0.5  # the supervised term's normalisation (by the chosen candidates' targets) too
    try:
        loss, row, grads = step([small, large])  # the trainer's accumulation over two unequal micro-batches
        loss1, row1, grads1 = step([small + large])  # the same pairs as one batch
    finally:
        obj.sft_weight = trainer.cfg.dpo.sft_weight
        trainer.model.zero_grad(set_to_none=True)
    assert row["pairs"] == row1["pairs"] == len(small) + len(large)
    assert loss == pytest.approx(loss1, rel=1e-5) and row["sft_loss"] == pytest.approx(row1["sft_loss"], rel=1e-5)
    for g, h in zip(grads, grads1):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    assert max(float(g.abs().max()) for g in grads) > 0

    cfg = copy.deepcopy(trainer.cfg)  # a pair longer than the budget is refused, naming its line
    cfg.data.max_tokens_per_batch = int(lengths.max()) - 1
    with pytest.raises(DataError, match=r"pairs.jsonl:\d+: the pair needs \d+ positions .* more than "
                                        r"data.max_tokens_per_batch="):
        load_preference_data(cfg, DistEnv(), trainer.tokenizer, trainer.raw.config, quiet=True)


DPO_RESUME = (*RESUME_RUN, "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2")


def test_resume_from_half_way_equals_straight(tmp_path):
    pairs = write_tiny_pairs(tmp_path / "prefs", prompts=6)
    train(tiny_config(tmp_path / "straight", *dpo_overrides(pairs, *DPO_RESUME), samples=2))
    ref = tmp_path / "straight" / "run"
    half = ref / "checkpoints" / "step_000002"
    train(tiny_config(tmp_path / "resumed", *dpo_overrides(pairs, *DPO_RESUME, f"train.resume={half}"), samples=2))
    resumed = tmp_path / "resumed" / "run"
    assert_same_weights(final_weights(resumed), final_weights(ref))
    keys = ("step", "loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "grad_norm", "lr")
    rows = [[{k: r[k] for k in keys} for r in read_metrics(run)] for run in (ref, resumed)]
    assert rows[1] == rows[0][2:]
    assert rows[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and rows[0][-1]["rewards/margins"] != 0


def test_a_damaged_pairs_file_is_one_line_before_training(tmp_path, capsys):
    pairs = write_tiny_pairs(tmp_path / "prefs", prompts=3)
    shard = sorted((pairs.parent / "codes").glob("part-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:30])
    cfg = tiny_config(tmp_path, *dpo_overrides(pairs), samples=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    line = f"higgs-ddp: error: {pairs}:1: chosen codes codes/part-00000.safetensors: not a readable shard"
    # Under a launcher the same check runs before torchrun starts a rank: one line, no run folder
    assert cli(["train", "--nproc-per-node", "2", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr()
    assert err.err.splitlines()[0].startswith(line) and not err.out, err
    assert not (tmp_path / "run").exists()
    assert main(["--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr()
    first = err.err.splitlines()[0]
    assert first.startswith(line), first
    assert "run card" not in err.out and not (tmp_path / "run" / "checkpoints").exists()
    # pairs of another codec: the launcher knows the codec's identity without loading anything
    header = pairs.parent / "prefs.json"
    header.write_text(header.read_text().replace('"codec": "tiny:', '"codec": "other:'))
    assert cli(["train", "--nproc-per-node", "2", "--config", str(tmp_path / "run.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"higgs-ddp: error: {header}: codec is 'other:")


def test_init_from_an_sft_run_is_the_reference(tmp_path):
    """A DPO run that starts from a supervised run: its reference (the adapter off) is that run's model, as
    export --merge writes it; its first loss is log 2; export --merge of the DPO run rebuilds the same base."""
    from higgs_ddp.tools.export import export, merged_model
    from higgs_ddp.tools.weights import trained_weights

    sft_cfg = tiny_config(tmp_path / "sft", "train.max_steps=2", "train.lr=5e-2", "train.warmup_steps=0", samples=4)
    train(sft_cfg)
    sft = tmp_path / "sft" / "run"
    pairs = write_tiny_pairs(tmp_path / "prefs", prompts=4)
    cfg = tiny_config(tmp_path / "dpo", *dpo_overrides(pairs, f"train.init_from={sft}", "train.max_steps=2",
                                                      "train.micro_batch_size=2", *PLAIN), samples=2)
    trainer = Trainer(cfg, DistEnv(), base=starting_base(cfg))  # as higgs-ddp train builds it
    with trained_weights(sft, tmp_path / "scratch") as t:
        sft_model = merged_model(t.folder, t.cfg, trainer.tokenizer, adapter=t.adapter)
    b = next(iter(trainer.loader))
    with torch.no_grad():
        with trainer.model.disable_adapter():
            ref = trainer.wrapped(**b.model_inputs())
        theirs = HiggsForward(sft_model)(**b.model_inputs())
        plain = Trainer(tiny_config(tmp_path / "plain", *dpo_overrides(pairs, "train.micro_batch_size=2", *PLAIN),
                                    samples=2), DistEnv())
        base = plain.wrapped(**b.model_inputs())
    assert torch.equal(ref["audio_logits"], theirs["audio_logits"])
    assert not torch.allclose(ref["audio_logits"], base["audio_logits"])  # the SFT run did move the model
    # train.mode=full from the same run: its frozen copy is that merged model too
    full_cfg = tiny_config(tmp_path / "full", *dpo_overrides(pairs, f"train.init_from={sft}", "train.mode=full",
                                                             "train.micro_batch_size=2", *PLAIN), samples=2)
    full = Trainer(full_cfg, DistEnv(), base=starting_base(full_cfg))
    with torch.no_grad():
        assert torch.equal(full.reference.module(**b.model_inputs())["audio_logits"], theirs["audio_logits"])

    train(cfg)
    dpo = tmp_path / "dpo" / "run"
    assert read_metrics(dpo)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    export(dpo, tmp_path / "merged", merge=True)
    merged = _import_higgs()[1].from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        exported = HiggsForward(merged)(**b.model_inputs())
    assert not torch.allclose(exported["audio_logits"], theirs["audio_logits"])  # DPO moved it further
    assert torch.isfinite(exported["audio_logits"]).all()

    # A supervised run continues from it the same way: its first loss is where the earlier run ended, not
    # where the base starts.
    more = tiny_config(tmp_path / "more", f"train.init_from={sft}", "train.max_steps=1", samples=4)
    train(more)
    first = [r["loss"] for r in read_metrics(sft)]
    assert read_metrics(tmp_path / "more" / "run")[0]["loss"] < first[0] - 0.05, first
