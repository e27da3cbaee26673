"""An export computes exactly what base + trained weights compute and loads in the inference engine.

higgs_ddp.tools.export: a merged folder computes exactly what base + trained weights compute, loads with
HiggsAudioModel.from_pretrained and the inference engine, and every bad input is one line and exit code 2."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import EARLY, ROOT, flip_byte, make_checkpoint, tiny_config, two_samples
from safetensors.torch import load_file, save_file

from higgs_ddp.model import HiggsForward, build_model, load_tokenizer
from higgs_ddp.tools.export import main


@torch.no_grad()
def logits(model, b):
    out = HiggsForward(model).eval()(**b.model_inputs())
    return out["logits"], out["audio_logits"]


def higgs_from_pretrained(path, **kw):
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    return HiggsAudioModel.from_pretrained(str(path), **kw)


def test_merged_lora_computes_base_plus_adapter(tmp_path):
    from transformers import AutoTokenizer

    cfg, tok, peft_model, ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    merged = higgs_from_pretrained(out)
    assert merged.dtype == torch.float32  # auto, random init
    b = two_samples(tok, merged.config)
    want_text, want_audio = logits(peft_model, b)
    got_text, got_audio = logits(merged, b)
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_audio, want_audio, rtol=1e-5, atol=1e-5)
    base_text, base_audio = logits(build_model(cfg, tok), b)  # same seed, same random base
    assert (got_text - base_text).abs().max() > 1e-2 and (got_audio - base_audio).abs().max() > 1e-2, \
        "the adapter changed nothing: the comparison above would be vacuous"
    assert not any("lora" in k for k in merged.state_dict())

    loaded = AutoTokenizer.from_pretrained(str(out))  # the inference engine's way
    text = "<|audio_out_bos|>hi there<|AUDIO_OUT|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 120 and info["mode"] == "lora" and info["merged"] and info["dtype"] == "float32"
    assert info["base_model"] == "random init"


@pytest.mark.parametrize("mode", ["full", "audio_ffn"])
def test_merged_trainable_tensors_round_trip_exactly(tmp_path, mode):
    cfg, tok, trained, ckpt = make_checkpoint(tmp_path, mode)
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    merged = higgs_from_pretrained(out)
    want = trained.state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    b = two_samples(tok, merged.config)
    torch.testing.assert_close(logits(merged, b), logits(trained, b), rtol=0, atol=0)
    base = build_model(cfg, tok).state_dict()
    assert any(not torch.equal(base[k], want[k]) for k in want)


def test_auto_dtype_follows_the_pretrained_base(tmp_path):
    cfg = tiny_config(tmp_path / "a", samples=2)
    tok = load_tokenizer(cfg)
    base = tmp_path / "base"
    build_model(cfg, tok).to(torch.bfloat16).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    _, _, trained, ckpt = make_checkpoint(tmp_path / "b", "audio_ffn", "model.init=pretrained",
                                          f"model.path={base}", "model.tokenizer=null")
    for dtype, want in (("auto", torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / dtype
        assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge", "--dtype", dtype]) == 0
        merged = higgs_from_pretrained(out, torch_dtype="auto")
        assert merged.dtype == want
        name = "layers.0.audio_mlp.up_proj.weight"
        torch.testing.assert_close(merged.state_dict()[name], trained.state_dict()[name].to(want), rtol=0, atol=0)
        assert json.loads((out / "export.json").read_text())["base_model"] == {"path": str(base), "revision": None}


def test_a_lora_merged_onto_a_bf16_base_is_rounded_once(tmp_path):
    """The merge is built in the base's bf16 (half the memory of fp32: what lets the 5.8B model merge on a
    24 GB machine) and equals, bit for bit, merging in fp32 and casting after. peft's own merge on the bf16
    model rounds twice and differs: the negative control."""
    from copy import deepcopy

    cfg = tiny_config(tmp_path / "a", samples=2)
    tok = load_tokenizer(cfg)
    base = tmp_path / "base"
    build_model(cfg, tok).to(torch.bfloat16).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    cfg, _, peft_model, ckpt = make_checkpoint(tmp_path / "b", "lora", "model.init=pretrained", f"model.path={base}",
                                               "model.tokenizer=null", "lora.alpha=64")
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    got = higgs_from_pretrained(out, torch_dtype="auto").state_dict()
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    fp32 = deepcopy(peft_model).float().merge_and_unload().to(torch.bfloat16).state_dict()  # base is bf16-exact
    assert got.keys() == fp32.keys()
    for k in fp32:
        assert torch.equal(got[k], fp32[k]), k
    twice = deepcopy(peft_model).to(torch.bfloat16).merge_and_unload().state_dict()
    assert any(not torch.equal(got[k], twice[k]) for k in got), "rounding once vs twice made no difference here"


def test_unmerged_exports_copy_the_weights(tmp_path):
    from peft import PeftModel

    cfg, tok, peft_model, ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "adapter"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (ckpt / "adapter" / name).read_bytes()
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "export.json").read_text())["merged"] is False
    loaded = PeftModel.from_pretrained(build_model(cfg, tok), str(out))
    b = two_samples(tok, loaded.base_model.model.config)
    torch.testing.assert_close(logits(loaded, b), logits(peft_model, b), rtol=0, atol=0)


def test_merged_folder_serves_with_the_inference_engine(tmp_path):
    """boson_multimodal's HiggsAudioServeEngine on CPU: model + tokenizer from OUT, the tiny codec folder."""
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from higgs_ddp.data.codec import _tiny_semantic_teacher, save_tiny_codec_folder
    from higgs_ddp.data.prompt import build_chatml

    _, _, _, ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    codec = save_tiny_codec_folder(tmp_path / "codec")
    with _tiny_semantic_teacher():  # the codec's constructor would fetch its HuBERT teacher from the hub
        engine = HiggsAudioServeEngine(str(out), str(codec), device="cpu", kv_cache_lengths=[256])
    r = engine.generate(build_chatml("Say this.", with_target=False), max_new_tokens=12, temperature=0.0,
                        force_audio_gen=True, seed=0)
    C = engine.model.config.audio_num_codebooks
    assert r.generated_audio_tokens.shape[0] == C and r.generated_audio_tokens.shape[1] > C
    assert r.audio is not None and r.audio.size > 0 and r.sampling_rate == 8000


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "higgs_ddp", "export", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path):
    _, _, _, ckpt = make_checkpoint(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    for args, words in [((tmp_path / "nope", tmp_path / "o1"), "not found"),
                        ((ckpt, busy), "not an empty folder")]:
        proc = run_cli("--checkpoint", args[0], "--out", args[1], "--merge")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("higgs-ddp: error: "), proc.stderr
        assert words in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "o1").exists()


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    _, _, _, ckpt = make_checkpoint(tmp_path)
    renamed = tmp_path / "renamed"  # an unmerged export (no checksums) with a tensor no module takes
    shutil.copytree(ckpt / "adapter", renamed)
    shutil.copy(ckpt / "config.yaml", renamed / "config.yaml")
    state = load_file(str(renamed / "adapter_model.safetensors"))
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key.replace("q_proj", "q_pr0j")] = state.pop(key)  # one left unloaded
    save_file(state, str(renamed / "adapter_model.safetensors"))
    shutil.copytree(renamed, tmp_path / "renamed_ckpt" / "adapter")  # the same in a checkpoint: its state.json
    for name in ("config.yaml", "state.json"):  # names every tensor it saved
        shutil.copy(ckpt / name, tmp_path / "renamed_ckpt" / name)
    bare = tmp_path / "bare"
    bare.mkdir()
    noweights = tmp_path / "noweights"  # a copy that missed the weights file
    shutil.copytree(ckpt, noweights)
    (noweights / "adapter" / "adapter_model.safetensors").unlink()
    for folder, words in [(renamed, "1 missing"), (tmp_path / "renamed_ckpt", "first missing: "),
                          (bare, "is none of"),
                          (noweights, f"{noweights / 'adapter' / 'adapter_model.safetensors'} is missing")]:
        assert main(["--checkpoint", str(folder), "--out", str(tmp_path / "out"), "--merge"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("higgs-ddp: error: ") and words in err, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_export_of_a_trained_run_is_the_trained_model(tmp_path):
    """End to end: train, then export the run folder (its latest checkpoint) merged; the merged model
    computes what the trained base + adapter computes."""
    from peft import PeftModel

    from higgs_ddp.train import train

    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1")
    train(cfg)
    run = tmp_path / "run"
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(run), "--out", str(out), "--merge"]) == 0
    assert json.loads((out / "export.json").read_text())["step"] == 2
    tok = load_tokenizer(cfg)
    trained = PeftModel.from_pretrained(build_model(cfg, tok), str(run / "checkpoints" / "step_000002" / "adapter"))
    merged = higgs_from_pretrained(out)
    b = two_samples(tok, merged.config)
    for got, want in zip(logits(merged, b), logits(trained, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_flipped_bit_in_full_fine_tuned_weights_is_refused(tmp_path, capsys):
    """trainable.safetensors (train.mode=full): the merge checks its tensors against state.json's checksums."""
    _, _, _, ckpt = make_checkpoint(tmp_path, "full")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "before"), "--merge"]) == 0  # it was intact
    flip_byte(ckpt / "trainable.safetensors")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt / 'trainable.safetensors'} is damaged" in err, err
    assert not (tmp_path / "out").exists()


def test_a_runs_best_and_final_folders_export_as_speak_loads_them(tmp_path):
    """export --checkpoint RUN/best (eval.best_by) and RUN/final: the run's config.yaml beside them, the step
    each was kept at, and the weights speak loads from them."""
    from higgs_ddp.tools.inference import load_for_inference
    from higgs_ddp.train import train

    train(tiny_config(tmp_path, *EARLY, "train.save_every=0"))  # stops early at step 3, its best at step 2
    run = tmp_path / "run"
    assert (json.loads((run / "best" / "best.json").read_text())["step"],
            json.loads((run / "status.json").read_text())["step"]) == (2, 3)
    for name, step in (("best", 2), ("final", 3)):
        out = tmp_path / f"{name}-adapter"
        assert main(["--checkpoint", str(run / name), "--out", str(out)]) == 0, name
        assert (out / "adapter_model.safetensors").read_bytes() == \
            (run / name / "adapter_model.safetensors").read_bytes()
        assert not (out / "best.json").exists() and (out / "tokenizer" / "tokenizer_config.json").is_file()
        assert (out / "config.yaml").read_text() == (run / "config.yaml").read_text()
        assert json.loads((out / "export.json").read_text())["step"] == step
        merged = tmp_path / f"{name}-merged"
        assert main(["--checkpoint", str(run / name), "--out", str(merged), "--merge"]) == 0, name
        want = load_for_inference(run / name, device="cpu").model.state_dict()
        got = higgs_from_pretrained(merged).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_the_random_base_is_drawn_on_the_cpu_whatever_device_it_trains_on(tmp_path):
    """Export rebuilds a random-init base on the CPU from model.config and the seed. Drawn on a GPU (the CUDA
    generator) it would be another base, and the trained weights would merge onto the wrong one. A machine
    without a GPU still has another device to build for: meta, whose tensors hold no values at all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RandomDraws(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.devices = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.normal_, torch.ops.aten.uniform_):
                self.devices.add(args[0].device.type)
            return func(*args, **(kwargs or {}))

    cfg = tiny_config(tmp_path, samples=2)
    tok = load_tokenizer(cfg)
    with RandomDraws() as draws:
        on_meta = build_model(cfg, tok, device="meta")
    assert draws.devices == {"cpu"}
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}  # then moved where it runs
    on_cpu = build_model(cfg, tok, device="cpu").state_dict()
    rebuilt = build_model(cfg, tok).state_dict()  # what export does
    assert all(torch.equal(on_cpu[k], rebuilt[k]) for k in rebuilt)


def test_every_text_token_the_exported_model_can_sample_is_in_its_tokenizer(tmp_path):
    """The engine refuses a sampled text id >= len(tokenizer). The tiny model's text head is 272 wide
    (configs/tiny.yaml); its tokenizer must have 272 tokens too, as the official model's head and Llama-3
    tokenizer both have 128,256. Steered to the head's last id, generation at temperature 0.7 must go on."""
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from higgs_ddp.data.codec import _tiny_semantic_teacher, save_tiny_codec_folder
    from higgs_ddp.data.prompt import build_chatml

    _, _, _, ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "merged"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--merge"]) == 0
    with _tiny_semantic_teacher():
        engine = HiggsAudioServeEngine(str(out), str(save_tiny_codec_folder(tmp_path / "codec")), device="cpu",
                                       kv_cache_lengths=[256])
    head = engine.model.audio_decoder_proj.text_lm_head
    vocab = engine.model.config.text_config.vocab_size
    assert head.out_features == vocab == len(engine.tokenizer) == 272

    # First the head's last id, then an audio stream that runs to max_new_tokens (the engine needs one).
    mc, audio_bos, calls = engine.model.config, engine.tokenizer.convert_tokens_to_ids("<|audio_out_bos|>"), []

    def text_steer(module, args, logits):
        calls.append(1)
        logits[..., vocab - 1 if len(calls) == 1 else audio_bos] += 100.0
        return logits

    def no_stream_eos(module, args, logits):
        logits.view(-1, mc.audio_num_codebooks, mc.audio_codebook_size + 2)[..., mc.audio_stream_eos_id] -= 100.0
        return logits

    hooks = [head.register_forward_hook(text_steer),
             engine.model.audio_decoder_proj.audio_lm_head.register_forward_hook(no_stream_eos)]
    try:
        r = engine.generate(build_chatml("Say this.", with_target=False), max_new_tokens=16, temperature=0.7,
                            seed=0)
    finally:
        for h in hooks:
            h.remove()
    assert r.generated_text.startswith("<|reserved_special_token_1|>")  # id 271: reserved, as in Llama-3


def test_a_model_whose_text_vocabulary_is_not_the_tokenizers_is_refused(tmp_path):
    from higgs_ddp.config import ConfigError
    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

    cfg = tiny_config(tmp_path, samples=2)
    with pytest.raises(ConfigError, match="text vocabulary of 272 tokens but the tokenizer has 270"):
        build_model(cfg, build_tiny_tokenizer())  # a tokenizer other than the model's
    cfg = tiny_config(tmp_path / "small", "model.config.text_config.vocab_size=100", samples=2)
    with pytest.raises(ConfigError, match="text vocabulary of 100 tokens but the tokenizer has 270"):
        build_model(cfg, load_tokenizer(cfg))  # too small to hold the tiny tokenizer: nothing to pad
