"""Pairs from `prefs build` that prefer stopping raise the stop rate after a short DPO run; the same pairs swapped lower it.

The issue's behaviour test, end to end on the tiny model: a LoRA checkpoint speaks 12 prompts 4 times each
(detectors only, so the reward is mostly "stopped by itself": the chosen candidates stop, the rejected ones
hit the length limit); a 20-step DPO run from that checkpoint (train.init_from) on the pairs makes more of
144 seeded generations stop by themselves than the checkpoint did, and the same run on the pairs with
chosen and rejected swapped (the negative control) makes fewer. Every step is seeded: the numbers are the
same on every run (measured while a cut rejected candidate was still taught to end where it was cut: 0.424 for
the checkpoint, 0.583 after DPO on the pairs, 0.340 on the swapped pairs; 8 minutes, 5.5 CPU-minutes, on 2
cores at a load of 6-9: hence extended. Since the pairs record "stopped" and a cut candidate has no end target,
it passes again, 21 minutes at a load of 10-12; those rates were not recorded)."""

import json
import shutil

import pytest
from helpers import PLAIN, dpo_overrides, make_checkpoint, tiny_config

TEXTS = ("hello there", "say this", "and a third one", "the fourth", "five is here", "six of them", "seven seas",
         "eight", "nine lives", "ten more", "eleven", "twelve days")
SAMPLING = dict(temperature=1.0, max_audio_seconds=0.3)


def stop_rate(model) -> float:
    """The share of 12 seeded generations per prompt that end by themselves within the length limit."""
    from higgs_ddp.evaluation.generation import Sampling, generation_state, speak_text
    from higgs_ddp.tools.inference import load_for_inference

    loaded, stopped, n = load_for_inference(model, "cpu"), 0, 0
    for text in TEXTS:
        for seed in range(100, 112):
            with generation_state(loaded.model, seed):
                gen = speak_text(loaded.model, loaded.tokenizer, loaded.codec, loaded.cfg, text,
                                 sampling=Sampling(**SAMPLING, seed=seed), decode=False).generated
            stopped, n = stopped + (not gen.hit_limit), n + 1
    return stopped / n


@pytest.mark.extended
def test_dpo_on_pairs_that_prefer_stopping_raises_the_stop_rate_and_swapped_pairs_lower_it(tmp_path):
    from higgs_ddp.tools.prefs import main as prefs
    from higgs_ddp.train import train

    _, _, _, ckpt = make_checkpoint(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    assert prefs(["build", "--model", str(ckpt), "--prompts", str(prompts), "--candidates", "4", "--out",
                  str(tmp_path / "prefs"), "--max-audio-seconds", "0.3", "--temperature", "1.0", "--asr-model",
                  "none", "--speaker-model", "none", "--device", "cpu"]) == 0
    pairs = [json.loads(line) for line in (tmp_path / "prefs" / "pairs.jsonl").read_text().splitlines()]
    cands = {c["key"]: c for c in map(json.loads, (tmp_path / "prefs" / "candidates.jsonl").read_text().splitlines())}
    assert len(pairs) >= 6 and all(cands[p["chosen"]["key"]]["stopped"] for p in pairs)
    assert sum(not cands[p["rejected"]["key"]]["stopped"] for p in pairs) >= len(pairs) - 1
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "prefs", swapped, ignore=shutil.ignore_patterns("work"))
    (swapped / "pairs.jsonl").write_text("".join(
        json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]}) + "\n" for p in pairs))
    rates = {"checkpoint": stop_rate(ckpt)}
    for name, folder in (("preferred", tmp_path / "prefs"), ("swapped", swapped)):
        train(tiny_config(tmp_path / name, *dpo_overrides(
            folder / "pairs.jsonl", f"train.init_from={ckpt}", "train.max_steps=20", "train.lr=1e-2",
            "train.warmup_steps=0", "train.micro_batch_size=2", "dpo.beta=0.1", *PLAIN), samples=2))
        rates[name] = stop_rate(tmp_path / name / "run")
    assert rates["preferred"] >= rates["checkpoint"] + 0.1, rates
    assert rates["swapped"] <= rates["checkpoint"] - 0.05, rates
