"""`higgs-ddp speak` loads the same weights from every kind of model path and speaks the same codes.

higgs-ddp speak and tools.inference.load_for_inference, on a tiny LoRA run trained here for two steps:
every kind of model path loads the same weights and speaks the same codes; bad input is one line, exit 2."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, flip_byte, make_checkpoint, steer, tiny_config, torchrun

from higgs_ddp.evaluation.generation import Sampling
from higgs_ddp.tools.inference import load_for_inference
from higgs_ddp.tools.weights import ModelPathError, model_kind


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA run of two steps (a checkpoint after each), its adapter export and its merged export."""
    from higgs_ddp.tools.export import export
    from higgs_ddp.train import train

    tmp = tmp_path_factory.mktemp("speak")
    cfg = tiny_config(tmp, "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1", "train.save_every=1",
                      samples=4)
    train(cfg)
    run = tmp / "run"
    export(run, tmp / "adapter")
    export(run, tmp / "merged", merge=True)
    return tmp


@pytest.fixture(scope="module")
def codec():
    from higgs_ddp.data.codec import load_codec

    return load_codec("tiny")


def codes_of(loaded, text="hello there", seed=3):
    """The (delayed) audio stream the loaded model generates for ``text``, as speak generates it."""
    from higgs_ddp.evaluation.generation import Sampling, generation_state, speak_text

    with generation_state(loaded.model, seed):
        return speak_text(loaded.model, loaded.tokenizer, loaded.codec, loaded.cfg, text,
                          sampling=Sampling(max_audio_seconds=0.2, seed=seed), decode=False).generated.columns


def test_a_run_its_checkpoint_adapter_and_merged_export_load_the_same_weights_and_speak_the_same_codes(
        trained, codec):
    run = trained / "run"
    want = load_for_inference(run, codec=codec)
    assert (want.kind, want.source, want.step) == ("final", run / "final", 2)  # the run finished
    assert not want.model.training and not any(p.requires_grad for p in want.model.parameters())
    assert type(want.model).__name__ == "HiggsAudioModel"  # no peft wrapper left
    assert want.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    want.model.cpu()
    ref, ref_codes = want.model.state_dict(), codes_of(want)
    assert ref_codes.shape[1] > 2
    for path, kind in [(run / "checkpoints" / "step_000002", "checkpoint"), (trained / "adapter", "adapter export"),
                       (trained / "merged", "merged")]:
        loaded = load_for_inference(path, device="cpu", codec=codec)
        assert loaded.codec is codec and (loaded.kind, loaded.step, loaded.cfg.data.codec) == (kind, 2, "tiny")
        got = loaded.model.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), path
        assert torch.equal(codes_of(loaded), ref_codes), path
    # Negative control: the step-1 checkpoint holds other weights, which speak other codes.
    older = load_for_inference(run / "checkpoints" / "step_000001", device="cpu", codec=codec)
    assert any(not torch.equal(older.model.state_dict()[k], ref[k]) for k in ref)
    older_codes = codes_of(older)
    assert not (older_codes.shape == ref_codes.shape and torch.equal(older_codes, ref_codes))


def test_trainable_tensors_load_from_a_checkpoint_an_export_and_a_final_folder(tmp_path, codec):
    """audio_ffn (as full): trainable.safetensors in a checkpoint, an unmerged export and final/ (config.json,
    the run's config.yaml beside it) all give the trained model."""
    from higgs_ddp.tools.export import export

    _, _, trained_model, ckpt = make_checkpoint(tmp_path, "audio_ffn")
    export(ckpt, tmp_path / "tensors")
    final = tmp_path / "run" / "final"
    final.mkdir()
    shutil.copy(ckpt / "trainable.safetensors", final)
    trained_model.config.save_pretrained(str(final))
    shutil.copy(ckpt / "config.yaml", tmp_path / "run" / "config.yaml")
    want = trained_model.state_dict()
    for path, kind in [(ckpt, "checkpoint"), (tmp_path / "tensors", "trainable export"), (final, "final")]:
        loaded = load_for_inference(path, device="cpu", codec=codec)
        assert (loaded.kind, loaded.cfg.train.mode) == (kind, "audio_ffn"), path
        got = loaded.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), path


def test_a_run_that_did_not_finish_speaks_from_its_latest_checkpoint(trained, tmp_path, codec):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "stopped"}))
    shutil.rmtree(run / "checkpoints" / "step_000002")  # final/ is from an earlier, finished run
    loaded = load_for_inference(run, device="cpu", codec=codec)
    assert (loaded.kind, loaded.step) == ("checkpoint", 1)


def test_a_path_of_no_accepted_kind_is_one_line(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, words in [(tmp_path / "nope", "not found"), (tmp_path / "empty", "is none of"),
                        (tmp_path / "file.txt", "is a file")]:
        with pytest.raises(ModelPathError, match=words) as e:
            load_for_inference(path, device="cpu")
        assert "\n" not in str(e.value)
    assert model_kind(trained / "run") == "run" and model_kind(trained / "run" / "final") == "final"


# --- higgs-ddp speak ----------------------------------------------------------------------------------

SHORT = ("--max-audio-seconds", "0.2")  # 5 frames: the tiny codec decodes slowly on CPU


def speak(*args):
    from higgs_ddp.tools.speak import main

    return main([*map(str, args)])


def test_the_same_seed_gives_the_same_audio(trained, tmp_path, capsys):
    import soundfile as sf

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert speak("--model", trained / "run", "--text", "hello there", "--seed", seed, *SHORT,
                     "--out", tmp_path / f"{name}.wav") == 0
    a, b, c = (tmp_path / f"{n}.wav" for n in "abc")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes(), "another seed must give other audio (else the check is vacuous)"
    info = json.loads(a.with_suffix(".json").read_text())
    wave, sr = sf.read(str(a), dtype="float32")
    assert sr == info["sample_rate"] == 8000 and info["seconds"] == pytest.approx(len(wave) / sr)
    assert info["seed"] == 5 and info["settings"]["temperature"] == 0.7 and info["settings"]["max_audio_seconds"] == 0.2
    assert info["text"] == "hello there" and info["model"]["kind"] == "final" and info["model"]["step"] == 2
    [piece] = info["pieces"]
    assert info["hit_limit"] == piece["hit_limit"] and piece["frames"] <= 5
    err = capsys.readouterr().err
    assert (f"{a} reached --max-audio-seconds=0.2 without the model ending it" in err) == info["hit_limit"]


def test_a_piece_that_never_ends_is_cut_at_the_limit_and_reported(trained, codec, tmp_path, capsys):
    """The audio head's stream EOS never wins (a hook on the real model): every piece runs to the limit."""
    from higgs_ddp.tools.speak import parser, sidecar, speak_utterance

    loaded = load_for_inference(trained / "merged", device="cpu", codec=codec)
    args = parser().parse_args(["--model", "m", "--text", "One. Two.", "--chunk-chars", "4", *SHORT, "--out", "o.wav"])
    handle = steer(loaded.model, lambda step: {loaded.model.config.audio_stream_eos_id: -1e4})
    try:
        wave, pieces = speak_utterance(loaded, args.text, None, Sampling(max_audio_seconds=0.2), args,
                                       tmp_path / "o.wav")
    finally:
        handle.remove()
    assert [(p["text"], p["frames"], p["hit_limit"]) for p in pieces] == [("One.", 5, True), ("Two.", 5, True)]
    assert sidecar(loaded, args.text, None, wave, pieces, Sampling(), args)["hit_limit"] is True
    err = capsys.readouterr().err
    for i in (1, 2):
        assert f"o.wav piece {i} of 2 reached --max-audio-seconds=0.2 without the model ending it" in err


def test_long_text_is_split_at_sentences_and_joined(trained, tmp_path):
    import soundfile as sf

    from higgs_ddp.tools.speak import split_text

    assert split_text("One two. Three four!  Five? «Six» (seven.) Eight", 12) == \
        ["One two.", "Three four!", "Five?", "«Six» (seven.)", "Eight"]
    assert split_text("A b. C d. E f.", 10) == ["A b. C d.", "E f."]  # packed up to the limit
    assert split_text("你好。再见！好", 3) == ["你好。", "再见！", "好"]  # full-width marks take no space
    text = "Hello there. How are you? Fine."
    assert speak("--model", trained / "merged", "--text", text, "--chunk-chars", "15", "--pause", "0.25", *SHORT,
                 "--out", tmp_path / "long.wav") == 0
    info = json.loads((tmp_path / "long.json").read_text())
    assert [p["text"] for p in info["pieces"]] == ["Hello there.", "How are you?", "Fine."]
    joined, sr = sf.read(str(tmp_path / "long.wav"), dtype="float32")
    lengths = [round(p["seconds"] * sr) for p in info["pieces"]]
    pause = round(0.25 * sr)
    assert len(joined) == sum(lengths) + 2 * pause
    # The second piece, spoken alone with the same seed, is the audio between the two pauses.
    assert speak("--model", trained / "merged", "--text", "How are you?", *SHORT, "--out", tmp_path / "two.wav") == 0
    alone, _ = sf.read(str(tmp_path / "two.wav"), dtype="float32")
    start = lengths[0] + pause
    assert len(alone) == lengths[1]
    assert np.array_equal(joined[start:start + lengths[1]], alone)
    assert not joined[lengths[0]:start].any()  # the pause is silence


def test_a_text_file_gives_one_wav_per_line_in_the_reference_voice(trained, tmp_path):
    import soundfile as sf

    lines, ref = tmp_path / "lines.txt", tmp_path / "ref.wav"
    lines.write_text("hello there\n\nsay this\n")
    sf.write(str(ref), 0.3 * np.sin(np.arange(4000) * 0.07).astype(np.float32), 8000)  # 0.5 s, the codec's rate
    assert speak("--model", trained / "adapter", "--text-file", lines, "--ref-audio", ref, "--ref-text", "a tone",
                 "--scene", "a quiet room", *SHORT, "--out", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["line_0001.json", "line_0001.wav", "line_0003.json", "line_0003.wav"]
    info = json.loads((tmp_path / "out" / "line_0003.json").read_text())
    assert (info["line"], info["text"], info["reference_audio"], info["reference_text"]) == \
        (3, "say this", str(ref), "a tone")
    assert info["settings"]["scene"] == "a quiet room"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "higgs_ddp.speak", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_bad_input_is_one_line_and_exit_code_2(trained, tmp_path, capsys):
    model = trained / "merged"
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    not_audio = tmp_path / "ref.wav"
    not_audio.write_text("not audio")
    out = tmp_path / "o.wav"
    cases = [
        (("--text", "hi", "--ref-audio", tmp_path / "missing.wav", "--ref-text", "x"), "--ref-audio: audio",
         "not found"),
        (("--text", "hi", "--ref-audio", not_audio, "--ref-text", "x"), "--ref-audio: audio",
         "not a readable audio file"),
        (("--text-file", tmp_path / "missing.txt"), "--text-file", "not found"),
        (("--text-file", bad_utf8), "--text-file", "cannot be read"),
        (("--text-file", blank), "blank.txt: no text", "every line is empty"),
        (("--text", "  "), "--text is empty", ""),
        (("--text", "hi", "--ref-text", "words"), "a reference needs both its audio (--ref-audio)", ""),
        (("--text", "hi", "--top-p", "0"), "--top-p must be in (0, 1]", ""),
        (("--text", "hi", "--device", "bogus"), "device 'bogus'", ""),
    ]
    for args, *words in cases:
        assert speak("--model", model, *args, "--out", out) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("higgs-ddp: error: "), err
        assert all(w in err for w in words), err
    assert not out.exists()
    # A model path of no accepted kind, through `python -m higgs_ddp.speak`: nothing but the line on stderr.
    proc = run_cli("--model", tmp_path, "--text", "hi", "--out", out)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("higgs-ddp: error: model path "), proc.stderr


def test_a_reference_is_its_audio_and_its_words_as_in_a_manifest_line(tmp_path, capsys):
    """speak's options follow the manifest's rule (one function, data/manifest.py): --ref-audio alone is
    refused as a line with ref_audio and no ref_text is, before any model is loaded."""
    from higgs_ddp.data.manifest import read_manifest

    ref = tmp_path / "ref.wav"
    ref.write_bytes(b"")  # never read: the rule comes first
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"text": "hi", "audio": "a.wav", "ref_audio": "ref.wav"}) + "\n")
    _, problems = read_manifest(str(manifest))
    words = "a reference needs both its audio"
    assert [p.reason for p in problems] == ["ref_without_text"] and words in problems[0].message
    cases = [(("--ref-audio", ref), f"{words} (--ref-audio) and its transcript (--ref-text)"),
             (("--ref-text", "the words"), f"{words} (--ref-audio) and its transcript (--ref-text)"),
             (("--ref-audio", ref, "--ref-text", "  "), "the reference transcript --ref-text is empty")]
    for args, message in cases:
        assert speak("--model", tmp_path / "no_model", "--text", "hi", *args, "--out", tmp_path / "o.wav") == 2
        assert capsys.readouterr().err == f"higgs-ddp: error: {message}\n"


def test_out_with_text_is_the_wav_file_and_another_name_is_refused(tmp_path, capsys):
    """No undocumented name/speech.wav: with --text, --out is the file, its name ending in .wav; the error
    says so before any model is loaded. With --text-file, --out is a folder."""
    from higgs_ddp.tools.speak import output_paths, parser

    for out in (tmp_path / "name", tmp_path / "folder"):
        (tmp_path / "folder").mkdir(exist_ok=True)
        assert speak("--model", tmp_path / "no_model", "--text", "hi", "--out", out) == 2
        err = capsys.readouterr().err
        assert err == (f"higgs-ddp: error: --out {out}: --text speaks into one WAV file, whose name ends in .wav "
                       f"(say {out}.wav); a folder is for --text-file\n")
    assert not (tmp_path / "name").exists() and list((tmp_path / "folder").iterdir()) == []
    assert output_paths(tmp_path / "a.WAV", [(None, "hi")]) == [tmp_path / "a.WAV"]
    assert output_paths(tmp_path / "o", [(1, "a"), (3, "b")]) == [tmp_path / "o" / "line_0001.wav",
                                                                 tmp_path / "o" / "line_0003.wav"]
    assert "another name is refused" in " ".join(parser().format_help().split())


@pytest.mark.slow
def test_an_fsdp_sharded_checkpoint_loads_the_weights_of_its_final_folder(tmp_path, codec):
    """Two gloo ranks under fsdp: the checkpoint holds each rank's rows (shards/), assembled on loading."""
    import yaml

    cfg = tiny_config(tmp_path, "train.parallel=fsdp", "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1",
                      "train.micro_batch_size=1", samples=4)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = torchrun(2, "--config", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "shards" / "rank_00001.safetensors").is_file()
    sharded = load_for_inference(ckpt, device="cpu", codec=codec)
    final = load_for_inference(tmp_path / "run" / "final", device="cpu", codec=codec)
    assert (sharded.kind, sharded.step, final.kind) == ("checkpoint", 2, "final")
    a, b = sharded.model.state_dict(), final.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(codes_of(sharded), codes_of(final))


# --- a damaged checkpoint -----------------------------------------------------------------------------

def test_a_damaged_checkpoint_is_refused_by_every_loader_in_one_line_naming_the_file(trained, tmp_path, capsys):
    """One bit flipped in the adapter's data (the file still reads): export, export --merge, speak and score
    check the weights against the checksums in state.json, as a resume does, and refuse it."""
    from higgs_ddp.tools.export import main as export_main
    from higgs_ddp.tools.score import main as score_main

    ckpt = tmp_path / "step_000002"
    shutil.copytree(trained / "run" / "checkpoints" / "step_000002", ckpt)
    damaged = ckpt / "adapter" / "adapter_model.safetensors"
    flip_byte(damaged)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "hello there"}\n')
    commands = {
        "export": lambda: export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]),
        "export --merge": lambda: export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--merge"]),
        "speak": lambda: speak("--model", ckpt, "--text", "hello there", *SHORT, "--device", "cpu",
                               "--out", tmp_path / "out.wav"),
        "score": lambda: score_main(["--model", str(ckpt), "--prompts", str(prompts), *SHORT, "--device", "cpu",
                                     "--out", str(tmp_path / "scores")]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("higgs-ddp: error: ")]
        assert len(errors) == 1 and "Traceback" not in err, (name, err)
        assert f"{damaged} is damaged" in errors[0] and "checksums" in errors[0], (name, errors[0])
    assert not any(p.name in ("out", "out.wav", "scores") for p in tmp_path.iterdir())


def test_dtype_bf16_loads_the_merged_weights_rounded_once_and_speaks(trained, codec, tmp_path):
    """--dtype: fp32 stays the CPU's default (the reference); bf16 (a GPU's default) holds the merged weights
    within bf16's rounding of fp32's, computes outputs of the same shapes close to fp32's, and speaks."""
    run = trained / "run"
    ref = load_for_inference(run, device="cpu", codec=codec)
    assert ref.dtype == torch.float32 and "in fp32" in ref.describe()
    assert all(p.dtype == torch.float32 for p in ref.model.parameters())
    half = load_for_inference(run, device="cpu", codec=codec, dtype="bf16")
    assert half.dtype == torch.bfloat16 and "in bf16" in half.describe()
    want = dict(ref.model.named_parameters())
    for name, p in half.model.named_parameters():
        # The tiny base is random fp32, rounded to bf16 before the merge and the sum again after: two half-ulps,
        # up to one ulp, 2^-7 of the tensor's largest weight (the released base is stored in bf16: one rounding there).
        assert p.dtype == torch.bfloat16, name
        assert float((p.float() - want[name]).abs().max()) <= 2 ** -7 * float(want[name].abs().max()), name
    tokens = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        a, b = (loaded.model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits for loaded in (ref, half))
    assert a.shape == b.shape and b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
    assert speak("--model", run, "--text", "hello there", *SHORT, "--dtype", "bf16", "--device", "cpu",
                 "--out", tmp_path / "b.wav") == 0
    info = json.loads((tmp_path / "b.json").read_text())
    assert info["model"]["dtype"] == "bf16" and info["pieces"][0]["frames"] > 0 and info["invalid_codes"] == 0
