"""higgs_ddp.config: YAML + dotted overrides, typed and checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, tiny_config

from higgs_ddp.config import (
    OFFICIAL_REPO,
    OFFICIAL_REVISION,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
    valid_keys,
)

CONFIGS_DIR = ROOT / "configs"

# Smallest model section that passes the model checks without a model path.
RANDOM_MODEL = {"init": "random", "config": {"text_config": {"hidden_size": 64, "num_hidden_layers": 2}}}


def write_yaml(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


# --------------------------------------------------------------------------------------------- valid keys


def test_valid_keys_are_dotted_leaves():
    keys = valid_keys()
    for k in ("output_dir", "model.path", "model.config", "data.shuffle", "train.lr", "train.max_steps",
              "lora.target_modules", "lora.r"):
        assert k in keys
    # sections themselves are not leaves
    assert "train" not in keys and "model" not in keys
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------------------------ YAML + overrides


def test_yaml_and_overrides_applied_with_types(tmp_path):
    p = write_yaml(tmp_path, {
        "output_dir": "runs/x",
        "model": RANDOM_MODEL,
        "train": {"lr": 1.0e-3, "max_steps": 10, "min_lr_ratio": 0},
        "data": {"shuffle": True, "num_workers": 0},
    })
    cfg = load_config(str(p), [
        "train.lr=1e-4",  # YAML 1.1 reads this as a str; it must still become the float 1e-4
        "train.warmup_steps=7",
        "train.max_grad_norm=2",  # int given for a float field
        "lora.target_modules=[a,b]",
        "data.shuffle=false",
        "output_dir=runs/y",
    ])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float
    assert cfg.train.max_grad_norm == 2.0 and type(cfg.train.max_grad_norm) is float
    # an int in the YAML for a float field is a float too
    assert cfg.train.min_lr_ratio == 0.0 and type(cfg.train.min_lr_ratio) is float
    assert cfg.train.warmup_steps == 7 and type(cfg.train.warmup_steps) is int
    assert cfg.train.max_steps == 10  # from the YAML, untouched by overrides
    assert cfg.lora.target_modules == ["a", "b"]
    assert cfg.data.shuffle is False
    assert cfg.data.num_workers == 0
    assert cfg.output_dir == "runs/y"
    # untouched defaults survive
    assert cfg.train.mode == "lora"
    assert cfg.lora.r == 16


def test_overrides_without_file(tmp_path):
    cfg = load_config(None, ["model.path=/some/ckpt", "train.lr=3", "train.micro_batch_size=4"])
    assert cfg.model.path == "/some/ckpt"
    assert cfg.train.lr == 3.0 and type(cfg.train.lr) is float
    assert cfg.train.micro_batch_size == 4
    assert cfg.model.revision is None  # not the official repo: no default revision


def test_override_later_wins():
    cfg = load_config(None, ["model.path=x", "train.max_steps=5", "train.max_steps=9"])
    assert cfg.train.max_steps == 9


def test_lr_in_plain_exponent_notation(tmp_path):
    """`train.lr=1e-4` (and `lr: 1e-4` in YAML) must give the float 1e-4.

    PyYAML follows YAML 1.1, whose float pattern requires a dot: ``yaml.safe_load('1e-4')`` is the
    *string* '1e-4', so the config loader must accept it for float fields.
    """
    cfg = load_config(None, ["model.path=x", "train.lr=1e-4"])
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float
    p = tmp_path / "lr.yaml"
    p.write_text("model:\n  path: x\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(str(p))
    assert cfg.train.lr == pytest.approx(1e-4) and type(cfg.train.lr) is float


def test_free_form_model_config_override_merges(tmp_path):
    p = write_yaml(tmp_path, {"model": {"init": "random", "config": {
        "audio_num_codebooks": 4,
        "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
    }}})
    cfg = load_config(str(p), ["model.config.text_config.hidden_size=32",
                               "model.config.text_config.head_dim=8"])
    assert cfg.model.config["text_config"] == {"hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8}
    assert cfg.model.config["audio_num_codebooks"] == 4


def test_free_form_model_config_from_overrides_only():
    cfg = load_config(None, ["model.init=random", "model.config.text_config.hidden_size=32"])
    assert cfg.model.init == "random"
    assert cfg.model.config == {"text_config": {"hidden_size": 32}}


def test_parse_overrides_builds_tree():
    tree = parse_overrides(["train.lr=0.5", "data.shuffle=false", "lora.target_modules=[a, b]",
                            "model.config.text_config.hidden_size=32", "output_dir="])
    assert tree == {
        "train": {"lr": 0.5},
        "data": {"shuffle": False},
        "lora": {"target_modules": ["a", "b"]},
        "model": {"config": {"text_config": {"hidden_size": 32}}},
        "output_dir": "",
    }


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="train.lr"):
        parse_overrides(["train.lr"])


# ---------------------------------------------------------------------------------------- unknown keys


def test_unknown_override_key_names_key_and_suggests_the_nearest_not_all_keys():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.path=x", "train.lrr=1"])
    msg = str(ei.value)
    assert msg == "unknown config key 'train.lrr'; did you mean 'train.lr'?"


def test_unknown_yaml_key_names_key_and_suggests_the_nearest(tmp_path):
    p = write_yaml(tmp_path, {"model": {"path": "x"}, "train": {"micro_batch": 1}})
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    msg = str(ei.value)
    assert msg == "unknown config key 'train.micro_batch'; did you mean 'train.micro_batch_size'?"


def test_unknown_yaml_section(tmp_path):
    p = write_yaml(tmp_path, {"model": {"path": "x"}, "trian": {"lr": 1.0}})
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(ei.value) == "unknown config key 'trian'; did you mean 'train'?"


@pytest.mark.parametrize("key, hint", [
    ("data.lr", "did you mean 'train.lr'?"),  # the right name in the wrong section
    ("trian.warmup", "did you mean 'train.warmup_steps'?"),
    ("eval.zzz", "the keys of 'eval': every, max_batches, "),  # nothing near: what the section holds
    ("zzz.lr", "did you mean 'train.lr'?"),
    ("zzz", "the top level holds: output_dir, model, data, train, lora, dpo, eval, logging, bench"),
])
def test_an_unknown_key_gets_a_few_names_never_the_whole_list(key, hint):
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.path=x", f"{key}=1"])
    msg = str(ei.value)
    assert msg.startswith(f"unknown config key {key!r}; {hint}"), msg
    assert "bench.find_largest_micro_batch" not in msg and msg.count(",") < 15, msg


def test_unknown_override_section():
    with pytest.raises(ConfigError, match="trian.lr"):
        load_config(None, ["model.path=x", "trian.lr=1"])


def test_section_must_be_mapping(tmp_path):
    p = write_yaml(tmp_path, {"model": {"path": "x"}, "train": 3})
    with pytest.raises(ConfigError, match="'train'"):
        load_config(str(p))


# ----------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),  # a bool is not an int
    ("data.shuffle=3", "data.shuffle"),
    ("data.shuffle=yesplease", "data.shuffle"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=true", "train.lr"),
    ("lora.target_modules=q_proj", "lora.target_modules"),
    ("model.path=[a]", "model.path"),
])
def test_wrong_type_override_names_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.path=x", override])
    assert repr(key) in str(ei.value)


def test_wrong_type_in_yaml_names_key(tmp_path):
    p = write_yaml(tmp_path, {"model": {"path": "x"}, "data": {"shuffle": "maybe"}})
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert "'data.shuffle'" in str(ei.value)
    assert "bool" in str(ei.value)


@pytest.mark.parametrize("override, key", [
    ("train.mode=qlora", "train.mode"),
    ("train.precision=fp16", "train.precision"),
    ("train.loss_alignment=left", "train.loss_alignment"),
    ("model.init=zeros", "model.init"),
])
def test_bad_choice(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.path=x", override])
    msg = str(ei.value)
    assert repr(key) in msg
    assert "must be one of" in msg


def test_good_choices_accepted():
    cfg = load_config(None, ["model.path=x", "train.mode=audio_ffn", "train.precision=fp32",
                             "train.loss_alignment=aligned"])
    assert (cfg.train.mode, cfg.train.precision, cfg.train.loss_alignment) == ("audio_ffn", "fp32", "aligned")


@pytest.mark.parametrize("key", ["train.micro_batch_size", "train.grad_accum_steps", "train.max_steps"])
def test_counts_must_be_positive(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.path=x", f"{key}=0"])


# ------------------------------------------------------------------------------ ranges and rules
# Each value below used to reach the run: a ZeroDivisionError (log_every), a traceback from torch / peft /
# transformers, a run stopped for a finite loss (max_bad_steps=0), or a silently wrong run.


@pytest.mark.parametrize("override, key", [
    ("train.log_every=0", "train.log_every"),  # ZeroDivisionError at step 1
    ("train.lr=-1", "train.lr"),  # torch: Invalid learning rate
    ("lora.r=0", "lora.r"),  # peft
    ("lora.dropout=2", "lora.dropout"),  # torch: dropout probability
    ("lora.dropout=1", "lora.dropout"),  # drops everything
    ("train.betas=[0.9]", "train.betas"),  # torch: not enough values to unpack
    ("train.betas=[0.9, 1.5]", "train.betas"),
    ("train.betas=[a, b]", "train.betas"),
    ("data.num_workers=-1", "data.num_workers"),  # torch DataLoader
    ("data.prefetch_factor=0", "data.prefetch_factor"),
    ("model.attn_implementation=foo", "model.attn_implementation"),  # KeyError in boson's layers
    ("train.max_bad_steps=0", "train.max_bad_steps"),  # stopped at step 1 "for a non-finite loss"
    ("lora.alpha=0", "lora.alpha"),  # the adapter stays exactly zero
    ("train.min_lr_ratio=5", "train.min_lr_ratio"),  # the LR climbs to 5x the peak
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio"),
    ("train.warmup_steps=-3", "train.warmup_steps"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("eval.temperature=-1", "eval.temperature"),
    ("eval.max_audio_seconds=0", "eval.max_audio_seconds"),  # one frame, then "the model did not stop"
    ("data.max_audio_seconds=-1", "data.max_audio_seconds"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),  # silently no clipping
    ("train.text_weight=-1", "train.text_weight"),
    ("eval.every=-1", "eval.every"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.text_logits_chunk=-1", "train.text_logits_chunk"),
    ("lora.target_modules=[]", "lora.target_modules"),
    ("bench.audio_fraction=2", "bench.audio_fraction"),
])
def test_out_of_range_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["model.path=x", override])
    msg = str(ei.value)
    assert f"config key {key!r} must be" in msg and ", got " in msg and "\n" not in msg


@pytest.mark.parametrize("override", [
    "data.max_audio_seconds=0",  # no limit
    "eval.temperature=0", "train.lr=0", "train.warmup_steps=0", "train.min_lr_ratio=0", "train.min_lr_ratio=1",
    "train.weight_decay=0", "data.num_workers=0", "lora.dropout=0", "train.betas=[0, 0.999]",
    "train.max_grad_norm=0", "train.text_weight=0", "eval.max_audio_seconds=0.5",
])
def test_edge_values_that_mean_something_are_accepted(override):
    load_config(None, ["model.path=x", override])


def test_ranges_name_their_meaning():
    with pytest.raises(ConfigError, match=r"'eval.max_audio_seconds' must be > 0 \(generation needs a length limit"):
        load_config(None, ["model.path=x", "eval.max_audio_seconds=0"])
    with pytest.raises(ConfigError, match=r"'data.val_fraction' must be in \[0, 1\), got 1.5"):
        load_config(None, ["model.path=x", "data.val_fraction=1.5"])


def test_rules_between_keys():
    with pytest.raises(ConfigError, match="eval.every needs a validation set"):
        load_config(None, ["model.path=x", "eval.every=5"])
    load_config(None, ["model.path=x", "eval.every=5", "data.val_fraction=0.1"])
    load_config(None, ["model.path=x", "eval.every=5", "data.val_manifest=v.jsonl"])
    with pytest.raises(ConfigError, match="train.text_weight and train.audio_weight are both 0"):
        load_config(None, ["model.path=x", "train.text_weight=0", "train.audio_weight=0"])


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=dpo"], "train.objective=dpo needs data.preferences"),
    (["data.preferences=p/pairs.jsonl"], "data.preferences is read by train.objective=dpo only"),
    (["train.objective=dpo", "data.preferences=p", "data.val_manifest=v.jsonl"], "not data.val_manifest"),
    (["train.objective=dpo", "data.preferences=p", "eval.every=5"], "eval.every needs a validation set: "
                                                                     "data.val_preferences"),
    (["train.objective=dpo", "data.preferences=p", "data.val_preferences=v", "data.val_fraction=0.1"], "not both"),
    (["train.objective=dpo", "data.preferences=p", "dpo.beta=0"], "'dpo.beta' must be > 0"),
])
def test_objective_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=x", *overrides])


def test_objective_defaults():
    cfg = load_config(None, ["model.path=x", "train.objective=dpo", "data.preferences=p", "eval.every=5",
                             "data.val_fraction=0.1"])
    assert (cfg.dpo.beta, cfg.dpo.sft_weight, cfg.dpo.length_normalized) == (0.1, 0.0, False)
    assert load_config(None, ["model.path=x"]).train.objective == "sft"
    for mode in ("audio_ffn", "full"):  # their reference is a frozen copy (training/preference.py)
        load_config(None, ["model.path=x", "train.objective=dpo", "data.preferences=p", f"train.mode={mode}"])


def test_flash_attention_and_cpu_offload_are_checked_against_the_machine():
    from higgs_ddp.config import check_machine

    cfg = load_config(None, ["model.path=x", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2 needs"):
        check_machine(cfg, "cpu")
    check_machine(load_config(None, ["model.path=x", "train.precision=bf16"]), "cpu")  # CPU bf16 autocast
    check_machine(load_config(None, ["model.path=x"]), "cpu")  # auto: fp32 on CPU
    offload = load_config(None, ["model.path=x", "train.parallel=fsdp", "train.fsdp.cpu_offload=true"])
    with pytest.raises(ConfigError, match="train.fsdp.cpu_offload=true needs GPUs"):
        check_machine(offload, "cpu")
    check_machine(offload, "cuda")


def test_fsdp_settings_are_checked():
    with pytest.raises(ConfigError, match="'train.fsdp.mixed_precision' must be one of"):
        load_config(None, ["model.path=x", "train.fsdp.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="train.find_unused_parameters is a DDP setting"):
        load_config(None, ["model.path=x", "train.parallel=fsdp", "train.find_unused_parameters=true"])


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_names_it():
    from higgs_ddp.config import check_machine

    cfg = load_config(None, ["model.path=x", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="needs the flash-attn package, which is not installed"):
        check_machine(cfg, "cuda")


@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=flash_attention_2", "model.attn_implementation=flash_attention_2 needs"),
    ("lora.target_modules=[nope]", "lora.target_modules entry 'nope' matches no module of the model"),
])
def test_the_run_stops_with_the_same_one_line_check(tmp_path, override, message):
    """train() reaches check_machine / check_lora_targets before anything trains (here: the tiny model)."""
    from higgs_ddp.train import train

    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tmp_path, override))


# -------------------------------------------------------------------------------------- model checks


def test_random_init_needs_inline_config():
    with pytest.raises(ConfigError, match="model.config"):
        load_config(None, ["model.init=random"])


def test_pretrained_init_needs_path():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["model.init=pretrained"])


def test_official_repo_gets_default_revision():
    cfg = load_config(None, [f"model.path={OFFICIAL_REPO}"])
    assert OFFICIAL_REPO == "bosonai/higgs-audio-v2-generation-3B-base"
    assert cfg.model.revision == OFFICIAL_REVISION == "10840182ca4ad5d9d9113b60b9bb3c1ef1ba3f84"


def test_official_repo_explicit_revision_kept(tmp_path):
    p = write_yaml(tmp_path, {"model": {"path": OFFICIAL_REPO, "revision": "main"}})
    assert load_config(str(p)).model.revision == "main"


def test_official_codec_is_pinned_to_the_last_revision_boson_loads(tmp_path):
    """The codec's hub `main` was rewritten (boson-ai/higgs-audio#176): the default follows the pin, not main."""
    from higgs_ddp.config import OFFICIAL_CODEC, OFFICIAL_CODEC_REVISION
    from higgs_ddp.data.codec import codec_identity

    cfg = load_config(None, ["model.path=x"])
    assert cfg.data.codec == OFFICIAL_CODEC and OFFICIAL_CODEC_REVISION == "9d4988fbd4ad07b4cac3a5fa462741a41810dbec"
    assert cfg.data.codec_revision == OFFICIAL_CODEC_REVISION
    # the code cache is keyed by the pinned revision, also where a caller names the codec without one
    assert codec_identity(OFFICIAL_CODEC) == codec_identity(OFFICIAL_CODEC, OFFICIAL_CODEC_REVISION)
    assert f"@{OFFICIAL_CODEC_REVISION}:" in codec_identity(OFFICIAL_CODEC)
    p = write_yaml(tmp_path, {"model": {"path": "x"}, "data": {"codec_revision": "main"}})
    assert load_config(str(p)).data.codec_revision == "main"  # an explicit revision is kept
    assert load_config(None, ["model.path=x", "data.codec=someone/codec"]).data.codec_revision is None


def test_other_repo_gets_no_default_revision():
    assert load_config(None, ["model.path=someone/other-model"]).model.revision is None


# --------------------------------------------------------------------------------------- file errors


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(missing))


@pytest.mark.parametrize("text, where, problem", [
    ("train:\n  lr: 1.0e-3\n   max_steps: 5\n", "3:13", "mapping values are not allowed here"),
    ("model:\n  path: x\ntrain: [unclosed\n", "4:1", "expected ',' or ']', but got '<stream end>' "
                                                     "(while parsing a flow sequence at line 3, column 8)"),
])
def test_invalid_yaml_names_file_line_and_column(tmp_path, text, where, problem):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(ei.value) == f"{p}:{where}: invalid YAML: {problem}"


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(p))


def test_manifest_resolved_relative_to_config_file(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfgs"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "m.jsonl").write_text("")
    p = write_yaml(cfg_dir, {"model": {"path": "x"}, "data": {"manifest": "data/m.jsonl"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(p))
    assert cfg.data.manifest == [str(cfg_dir / "data" / "m.jsonl")]  # a string is a one-item list


def test_eval_prompt_audio_paths_are_read_relative_to_the_config_file_alike(tmp_path, monkeypatch):
    """A prompt's reference_audio and speaker_audio are both paths: a config naming them relative to itself
    works from any folder for both (speaker_audio was read as given)."""
    cfg_dir = tmp_path / "cfgs"
    (cfg_dir / "voice").mkdir(parents=True)
    for name in ("ref.wav", "held_out.wav"):
        (cfg_dir / "voice" / name).write_bytes(b"")
    prompt = {"text": "hi", "reference_audio": "voice/ref.wav", "reference_text": "hello",
              "speaker_audio": "voice/held_out.wav"}
    p = write_yaml(cfg_dir, {"model": {"path": "x"}, "eval": {"prompts": [prompt]}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = load_config(str(p)).eval.prompts[0]
    assert got["reference_audio"] == str(cfg_dir / "voice" / "ref.wav")
    assert got["speaker_audio"] == str(cfg_dir / "voice" / "held_out.wav")


def test_manifest_lists_and_val_options(tmp_path):
    cfg = load_config(None, ["model.path=x", "data.manifest=[a.jsonl, b.jsonl]", "data.val_manifest=v.jsonl"])
    assert cfg.data.manifest == ["a.jsonl", "b.jsonl"] and cfg.data.val_manifest == ["v.jsonl"]
    with pytest.raises(ConfigError, match="path or a list of paths"):
        load_config(None, ["model.path=x", "data.manifest=[a.jsonl, 3]"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["model.path=x", "data.val_manifest=v.jsonl", "data.val_fraction=0.1"])
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        load_config(None, ["model.path=x", "data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["model.path=x", "data.on_error=ignore"])


def test_to_dict_round_trip():
    cfg = load_config(None, ["model.path=x", "train.lr=0.5"])
    d = cfg.to_dict()
    assert d["train"]["lr"] == 0.5
    assert d["model"]["path"] == "x"


# --------------------------------------------------------------------------------- shipped configs


SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml")) + sorted(CONFIGS_DIR.glob("*.yml"))


def test_configs_dir_has_yaml_files():
    assert SHIPPED, f"no YAML files in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_starts_with_run_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: first line must be a comment naming the command that runs it"
    assert any(cmd in first for cmd in ("make", "higgs-ddp", "torchrun", "python -m")), (
        f"{path.name}: first line {first!r} names no command (make / higgs-ddp / torchrun / python -m)"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps >= 1
    assert cfg.model.path or cfg.model.config


def test_the_key_reference_names_every_key_and_only_real_ones():
    """The key reference in docs/configuration.md cannot drift from the fields: each row's keys (``a`` / ``b`` pairs,
    ``section.*``) are config keys, and every config key is in a row."""
    import re

    from higgs_ddp.config import valid_keys

    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text[text.index("| `output_dir` |"):].split("\n\n")[0]  # the reference: from its first row to its end
    rows = table.splitlines()
    named = [k for row in rows for k in re.findall(r"`([a-z_.*]+)`", row.split(" | ")[0])]
    keys = set(valid_keys())
    covered = {k for k in keys for n in named if k == n or (n.endswith(".*") and k.startswith(n[:-1]))}
    assert [n for n in named if n not in keys and not n.endswith(".*")] == []
    assert sorted(keys - covered) == []
