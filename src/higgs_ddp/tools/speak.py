"""Hear a fine-tune: text in, WAV out, from a run folder, a checkpoint, an adapter or a merged export.

    higgs-ddp speak --model runs/my_voice --text "Hello there. How are you?" --out hello.wav
    higgs-ddp speak --model exported/merged --text-file lines.txt --ref-audio me.wav --ref-text "..." --out out/

Generation is the listening samples' own (evaluation/generation.py ``speak_text``): boson_multimodal's
inference engine step for step, with its sampling settings and defaults. Long text is split at sentence
boundaries into pieces of at most --chunk-chars characters, each piece spoken with the same seed (and the
same reference), and the pieces joined with --pause seconds of silence. Without a reference the model picks
a voice for each piece: give --ref-audio for one voice throughout.

Each WAV gets a JSON sidecar (same name, .json): the text, the model, the seed and settings, and per piece
its length and whether it hit --max-audio-seconds without the model ending it (reported, never hidden).
Codes outside the codebook are counted (``invalid_codes``) and the audio of that piece stops before them;
nothing is clamped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from higgs_ddp.data.manifest import reference_problem
from higgs_ddp.evaluation.generation import Sampling, flag_name
from higgs_ddp.errors import HiggsError, report
from higgs_ddp.runtime.files import atomic_file
from higgs_ddp.tools.inference import DTYPE_CHOICES, DTYPE_HELP, dtype_name

# A sentence ends at . ! ? or … (closing quotes and brackets stay with it) before white space, or right
# after the full-width marks of Chinese and Japanese, which take no space.
SENTENCE_END = re.compile(r"(?<=[.!?…][\"'”’)\]])\s+|(?<=[.!?…])\s+|(?<=[。！？])")


class SpeakError(HiggsError, ValueError):
    pass


def split_text(text: str, max_chars: int) -> list[str]:
    """Sentences packed greedily into pieces of at most ``max_chars`` characters; a longer sentence stays whole
    (it is never cut mid-sentence)."""
    sentences = [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if s and s.strip()]
    pieces: list[str] = []
    for sentence in sentences:
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
            pieces[-1] += " " + sentence
        else:
            pieces.append(sentence)
    return pieces


def read_texts(text: Optional[str], text_file: Optional[Path]) -> list[tuple[Optional[int], str]]:
    """-> [(line number in --text-file or None, text)]; blank lines of the file are not utterances."""
    if text is not None:
        if not text.strip():
            raise SpeakError("--text is empty")
        return [(None, text.strip())]
    try:
        lines = text_file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not text to speak
    except FileNotFoundError:
        raise SpeakError(f"--text-file {text_file} not found") from None
    except IsADirectoryError:
        raise SpeakError(f"--text-file {text_file} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpeakError(f"--text-file {text_file} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    texts = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if not texts:
        raise SpeakError(f"{text_file}: no text (every line is empty)")
    return texts


def output_paths(out: Path, texts: list) -> list[Path]:
    """--out, as --help says: with --text the WAV file itself (its name ends in .wav; any other name is
    refused, not taken for a folder or given a suffix); with --text-file a folder, one line_NNNN.wav per
    line, or one .wav file when the file holds one utterance."""
    is_wav = out.suffix.lower() == ".wav"
    if texts[0][0] is None and not is_wav:  # --text
        raise SpeakError(f"--out {out}: --text speaks into one WAV file, whose name ends in .wav (say "
                         f"{out.with_name(out.name + '.wav') if out.name else 'speech.wav'}); a folder is for "
                         f"--text-file")
    if is_wav:
        if len(texts) > 1:
            raise SpeakError(f"--out {out} is one file but --text-file has {len(texts)} utterances; give a folder")
        return [out]
    if out.exists() and not out.is_dir():
        raise SpeakError(f"--out {out} exists and is not a folder (a single file must end in .wav)")
    return [out / f"line_{n:04d}.wav" for n, _ in texts]


def _write_atomically(path: Path, write) -> None:
    try:
        with atomic_file(path) as tmp:
            write(tmp)
    except OSError as e:  # checked writable before the model loaded; a full disk since
        raise SpeakError(f"cannot write {path}: {e.strerror or e}") from None


def speak(args) -> list[Path]:
    """Everything after the arguments are parsed; -> the WAVs written. SpeakError / ModelPathError /
    ValueError: one line for the user."""
    from higgs_ddp.evaluation.generation import check_codec, generation_state, read_reference, reference_codes
    from higgs_ddp.runtime.shared_fs import unwritable
    from higgs_ddp.tools.inference import load_for_inference

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        ras_win_len=args.ras_win_len, ras_win_max_num_repeat=args.ras_win_max_num_repeat,
                        max_audio_seconds=args.max_audio_seconds, seed=args.seed)
    sampling.check(flag_name)
    if args.chunk_chars < 1 or args.pause < 0:
        raise SpeakError("--chunk-chars must be >= 1 and --pause >= 0")
    problem = reference_problem(args.ref_audio is not None, args.ref_text, "--ref-audio", "--ref-text")
    if problem:  # the manifest's rule: what the model learned a reference to be
        raise SpeakError(problem[1])
    if args.scene is not None and not args.scene.strip():
        raise SpeakError("--scene is empty")
    texts = read_texts(args.text, args.text_file)
    paths = output_paths(args.out, texts)
    why = unwritable(paths[0].parent)  # before the model loads and speaks, not after
    if why:
        raise SpeakError(f"--out {args.out}: {paths[0].parent} cannot be written ({why})")
    if args.ref_audio is not None:  # before the model loads (it can take minutes): a wrong path fails at once
        read_reference(args.ref_audio, "--ref-audio", 0, 0)

    loaded = load_for_inference(args.model, args.device, dtype=args.dtype)
    check_codec(loaded.model, loaded.codec)
    print(f"speaking with {loaded.describe()}", flush=True)
    conditioning = reference_conditioning(loaded.cfg, args.ref_audio)
    if conditioning:
        print(f"--ref-audio conditioned as the run's training audio was: data.audio {conditioning}", flush=True)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    with generation_state(loaded.model, sampling.seed):
        ref_codes = None
        if args.ref_audio is not None:  # now checked against the codec's shortest input and the run's limits
            ref_codes = reference_codes(loaded.cfg, loaded.codec, args.ref_audio, "--ref-audio")
        for (line, text), path in zip(texts, paths):
            wave, pieces = speak_utterance(loaded, text, ref_codes, sampling, args, path)
            record = sidecar(loaded, text, line, wave, pieces, sampling, args)
            _write_atomically(path, lambda tmp: _write_wav(tmp, wave, loaded.codec.sample_rate))
            _write_atomically(path.with_suffix(".json"),
                              lambda tmp: tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n"))
            print(f"{path}: {record['seconds']:.2f} s in {len(pieces)} piece{'s' * (len(pieces) > 1)}"
                  f"{', hit the length limit' if record['hit_limit'] else ''}", flush=True)
    return paths


def reference_conditioning(cfg, ref_audio) -> str:
    """The run's data.audio in words when it changes a reference given to speak, else "": training heard
    its references conditioned, so speak conditions --ref-audio the same way, and says so."""
    from higgs_ddp.evaluation.generation import describe_conditioning

    return describe_conditioning(cfg.data.audio) if ref_audio is not None else ""


def speak_utterance(loaded, text: str, ref_codes, sampling: Sampling, args, path: Path) -> tuple[np.ndarray, list]:
    """One utterance, piece by piece through the listening samples' ``speak_text``, joined with pauses;
    -> (wave, one record per piece). A piece that hit the length limit or held invalid codes is reported."""
    from higgs_ddp.evaluation.generation import speak_text

    codec = loaded.codec
    silence = np.zeros(round(args.pause * codec.sample_rate), dtype=np.float32)
    pieces = split_text(text, args.chunk_chars)
    waves, records = [], []
    for i, piece in enumerate(pieces):
        spoken = speak_text(loaded.model, loaded.tokenizer, codec, loaded.cfg, piece, args.ref_text, ref_codes,
                            sampling=sampling, scene=args.scene, what=str(path))
        gen = spoken.generated
        waves += [silence, spoken.wave] if waves else [spoken.wave]
        records.append({"text": piece, "frames": int(gen.codes.shape[1]),
                        "seconds": round(len(spoken.wave) / codec.sample_rate, 4), "hit_limit": gen.hit_limit,
                        "invalid_codes": gen.invalid_codes, "generate_seconds": round(spoken.generate_seconds, 3)})
        which = f" piece {i + 1} of {len(pieces)}" if len(pieces) > 1 else ""
        if gen.hit_limit:
            print(f"higgs-ddp speak: warning: {path}{which} reached --max-audio-seconds={sampling.max_audio_seconds:g} "
                  f"without the model ending it; cut there", file=sys.stderr, flush=True)
        if gen.invalid_codes:
            print(f"higgs-ddp speak: warning: {path}{which}: {gen.invalid_codes} generated codes outside the "
                  f"codebook; the audio stops before the first", file=sys.stderr, flush=True)
    return np.concatenate(waves), records


def sidecar(loaded, text: str, line: Optional[int], wave: np.ndarray, pieces: list, sampling: Sampling,
            args) -> dict:
    """The JSON written next to a WAV: what was spoken, by which model, how, and what came out."""
    rate = loaded.codec.sample_rate
    return {
        "text": text, **({"text_file": str(args.text_file), "line": line} if line is not None else {}),
        "model": {"path": str(args.model), "kind": loaded.kind, "source": str(loaded.source), "step": loaded.step,
                  "mode": loaded.cfg.train.mode, "dtype": dtype_name(loaded.dtype)},
        "seed": sampling.seed,
        "settings": {**asdict(sampling), "scene": args.scene, "chunk_chars": args.chunk_chars, "pause": args.pause},
        "reference_audio": str(args.ref_audio) if args.ref_audio is not None else None,
        "reference_text": args.ref_text,
        "reference_conditioning": reference_conditioning(loaded.cfg, args.ref_audio) or None,  # data.audio applied
        "sample_rate": rate, "seconds": round(len(wave) / rate, 4),
        "hit_limit": any(p["hit_limit"] for p in pieces),
        "invalid_codes": sum(p["invalid_codes"] for p in pieces),
        "clipped": int((np.abs(wave) > 1.0).sum()),  # decoded samples beyond [-1, 1], clipped by the 16-bit WAV
        "pieces": pieces,
    }


def _write_wav(path: Path, wave: np.ndarray, rate: int) -> None:
    import soundfile as sf

    sf.write(str(path), wave, rate, subtype="PCM_16", format="WAV")  # libsndfile clips to [-1, 1]


def parser() -> argparse.ArgumentParser:
    d = Sampling()
    p = argparse.ArgumentParser(prog="higgs-ddp speak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path,
                   help="a run folder, a checkpoint, a run's final/, an adapter export or a merged export")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to speak")
    text.add_argument("--text-file", type=Path, help="UTF-8 text, one utterance per line (blank lines skipped)")
    p.add_argument("--out", required=True, type=Path,
                   help="with --text: the WAV file, its name ending in .wav (another name is refused); with "
                        "--text-file: a folder, line_NNNN.wav per line (or a .wav for a one-line file). "
                        "A JSON sidecar goes beside each WAV")
    p.add_argument("--ref-audio", type=Path, help="reference audio: the voice to speak in (needs --ref-text)")
    p.add_argument("--ref-text", help="the transcript of --ref-audio: a reference is its audio and its words, "
                                      "as in a manifest line")
    p.add_argument("--scene", help="scene description for the system prompt, as training's 'scene'")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="(default %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="(default: none)")
    p.add_argument("--ras-win-len", type=int, default=d.ras_win_len,
                   help="repetition-aware sampling window, 0: off (default %(default)s)")
    p.add_argument("--ras-win-max-num-repeat", type=int, default=d.ras_win_max_num_repeat,
                   help="(default %(default)s)")
    p.add_argument("--max-audio-seconds", type=float, default=30.0,
                   help="length limit per piece; a piece that reaches it is cut and reported (default %(default)s)")
    p.add_argument("--chunk-chars", type=int, default=250,
                   help="long text is spoken in pieces of whole sentences up to this many characters "
                        "(default %(default)s)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds of silence between pieces (default %(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    return p


def main(argv=None) -> int:

    args = parser().parse_args(argv)
    try:
        speak(args)
    except HiggsError as e:  # and only that: a ValueError from torch is a bug, with its traceback
        return report(e)
    return 0
