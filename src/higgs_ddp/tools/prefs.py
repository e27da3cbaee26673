"""Preference pairs for DPO: K candidates per prompt, scored, the best valid one against the worst.

    higgs-ddp prefs build --model runs/my_voice --prompts prompts.jsonl --candidates 6 --out prefs/my_voice
    higgs-ddp prefs build --nproc-per-node 8 --model runs/my_voice --prompts prompts.jsonl --out prefs/my_voice

Each prompt is spoken K times by the model (anything ``higgs-ddp speak`` takes) through speak's own
generation path, candidate i with a seed made from --seed, the prompt's id and i (recorded). Each candidate
is checked by the detectors (stopped by itself, silence, speaking rate, clipping, codes outside the codebook)
and scored by Whisper (WER/CER) and the speaker model (similarity to the prompt's speaker_audio, else its
reference). The reward and the chosen candidate's filters are documented in docs/preferences.md
(Building pairs); the defaults follow NeMo Magpie-TTS: a chosen candidate stopped by itself, is not silent,
and has CER <= 0.01 where CER is measured; the rejected one is the worst of all.

--prompts is JSONL, one prompt per line: "text" and optionally "id" (default: the line number), "ref_audio"
+ "ref_text" (a voice to clone; score's "reference_audio" + "reference_text" are read too), "speaker_audio"
(a clip of the voice the candidates should have), "speaker", "language", and "speaking_rate" (the
speaker's characters per second in their corpus; --rates-from MANIFEST measures it, per speaker, for the
prompts that name a "speaker" and give none). Relative paths are relative to the file.

--out gets pairs.jsonl (what training's data.preferences reads), codes/ (the pairs' codes), candidates.jsonl
(every candidate with every score, chosen or not, and why not), unpaired.jsonl (each prompt without a
valid pair, and why), prefs.json (the settings, written last) and work/ (each prompt's candidates as they
finish). Run again after a kill: the prompts already in work/ are not generated again. Ranks share the
prompts; the same seed gives the same pairs on any number of ranks.

Scorer weights are never downloaded: a model that is not in its folder or the Hugging Face cache is one line
saying what to get, unless --scorers available, which builds with the scorers that are there (the
detectors always are) and records in prefs.json which were used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from higgs_ddp.data.manifest import reference_problem
from higgs_ddp.errors import HiggsError, InputError, report
from higgs_ddp.evaluation.generation import Sampling, flag_name
from higgs_ddp.evaluation.reward import Filters, RewardConfig, Weights, choose_pair, rejections, reward
from higgs_ddp.runtime.files import atomic_file, write_json_atomic, write_text_atomic
from higgs_ddp.runtime.launch_options import LAUNCH_HELP

PROMPT_KEYS = ("id", "text", "ref_audio", "ref_text", "reference_audio", "reference_text", "speaker_audio",
               "speaker", "language", "speaking_rate")
DEFAULT_ASR, DEFAULT_SPEAKER = "openai/whisper-large-v3", "microsoft/wavlm-base-plus-sv"
SHARD_PAIRS = 256  # pairs per codes/part-*.safetensors (two candidates each)
WORK, SETTINGS, IDENTITY = "work", "settings.json", "identity.json"


class PrefsError(HiggsError, ValueError):
    pass


# --- prompts ---------------------------------------------------------------------------------------------

def read_prompts(path: Path) -> list[dict]:
    """The prompts of a JSONL file -> [{id, line, text, reference_audio?, reference_text?, speaker_audio?,
    speaker?, language?, speaking_rate?}], paths made relative to the file; ``FILE:LINE: what`` otherwise
    (score's rules: a reference is its audio and its words together)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PrefsError(f"--prompts {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrefsError(f"--prompts {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    prompts, seen = [], {}
    for n, line in enumerate(lines, 1):
        if line.strip():
            prompt = _prompt(path, n, line)
            if prompt["id"] in seen:
                raise PrefsError(f"{path}:{n}: id {prompt['id']!r} is also the id of line {seen[prompt['id']]}; "
                                 f"each prompt needs its own (its candidates and pairs are named by it)")
            seen[prompt["id"]] = n
            prompts.append(prompt)
    if not prompts:
        raise PrefsError(f"{path}: no prompts (every line is empty)")
    return prompts


def _prompt(path: Path, n: int, line: str) -> dict:
    where = f"{path}:{n}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrefsError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not raw["text"].strip():
        raise PrefsError(f"{where}: a prompt is a JSON object with a non-empty \"text\"")
    unknown = set(raw) - set(PROMPT_KEYS)
    if unknown:
        raise PrefsError(f"{where}: unknown key(s) {sorted(unknown)}; a prompt has {', '.join(PROMPT_KEYS)}")
    for a, b in (("ref_audio", "reference_audio"), ("ref_text", "reference_text")):
        if a in raw and b in raw:
            raise PrefsError(f"{where}: both {a} and {b} (the same thing spelt two ways): give one")
    for key in ("id", "ref_audio", "ref_text", "reference_audio", "reference_text", "speaker_audio", "speaker",
                "language"):
        if key in raw and not isinstance(raw[key], str):
            raise PrefsError(f"{where}: \"{key}\" must be a string, got {raw[key]!r}")
    ref_audio = raw.get("ref_audio", raw.get("reference_audio"))
    ref_text = raw.get("ref_text", raw.get("reference_text"))
    names = ("ref_audio", "ref_text") if "ref_audio" in raw or "ref_text" in raw else ("reference_audio",
                                                                                       "reference_text")
    problem = reference_problem(bool(ref_audio), ref_text, *names)
    if problem:  # the manifest's rule, speak's and score's
        raise PrefsError(f"{where}: {problem[1]}")
    rate = raw.get("speaking_rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0
                             or not math.isfinite(rate)):
        raise PrefsError(f"{where}: \"speaking_rate\" is the speaker's characters per second, a number > 0, "
                         f"got {rate!r}")
    if "id" in raw and not raw["id"].strip():
        raise PrefsError(f"{where}: \"id\" is empty")
    prompt = {"id": raw.get("id", str(n)), "line": n, "text": raw["text"].strip()}
    if ref_audio:
        prompt["reference_audio"], prompt["reference_text"] = str(path.parent / ref_audio), ref_text
    if raw.get("speaker_audio"):
        prompt["speaker_audio"] = str(path.parent / raw["speaker_audio"])
    for key in ("speaker", "language", "speaking_rate"):
        if raw.get(key) is not None:
            prompt[key] = raw[key]
    return prompt


def fingerprint(prompt: dict) -> str:
    """What a prompt's candidates depend on: a work record made for another prompt under the same id is
    generated again, not reused."""
    keys = ("text", "reference_audio", "reference_text", "speaker_audio", "language", "speaking_rate")
    return hashlib.sha256(json.dumps([prompt.get(k) for k in keys]).encode()).hexdigest()[:16]


# --- scorers ---------------------------------------------------------------------------------------------

def find_scorers(args) -> tuple[dict, dict]:
    """-> ({"asr_model": folder or None, "speaker_model": ...} to use, {flag: why skipped}). With --scorers all
    a model that is not there is a PrefsError saying what to get; with available it is skipped."""
    from higgs_ddp.evaluation.scoring import check_resemblyzer, locate
    from higgs_ddp.evaluation.speaker import RESEMBLYZER

    found, skipped = {}, {}
    for key, flag, name in (("asr_model", "--asr-model", args.asr_model),
                            ("speaker_model", "--speaker-model", args.speaker_model)):
        found[key] = None
        if not name or name.lower() == "none":
            continue
        try:
            if name == RESEMBLYZER:
                check_resemblyzer(flag)
                found[key] = RESEMBLYZER
            else:
                found[key] = locate(name, flag)
        except InputError as e:
            if args.scorers == "all":
                raise PrefsError(f"{e}; or build without it: --scorers available (the scorers that are here) "
                                 f"or {flag} none") from None
            skipped[flag] = str(e)
    return found, skipped


def make_scorer(found: dict, language: str, device):
    """scoring.Scorer with the found models (None when there is none: the detectors only)."""
    if not any(found.values()):
        return None
    from higgs_ddp.config import Config
    from higgs_ddp.evaluation.scoring import Scorer

    holder = Config()
    holder.eval.asr_model, holder.eval.speaker_model, holder.eval.language = \
        found["asr_model"], found["speaker_model"], language
    return Scorer(holder, device, {"asr_model": "--asr-model", "speaker_model": "--speaker-model",
                                   "prompt": lambda i: ""})


# --- the work folder: one record per finished prompt -----------------------------------------------------

def record_name(prompt_id: str) -> str:
    return hashlib.sha256(prompt_id.encode()).hexdigest()[:24]


def read_record(work: Path, prompt: dict):
    """The finished candidates of ``prompt`` (its JSON record, whose codes file was written first), or None
    when it is not done (or was done for another prompt under this id, or cannot be read)."""
    path = work / f"{record_name(prompt['id'])}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("id") != prompt["id"] or record.get("fingerprint") != fingerprint(prompt):
        return None
    if not (work / record["codes"]).is_file():
        return None
    return record


def write_record(work: Path, prompt: dict, candidates: list) -> None:
    """Codes first, then the JSON naming them: a record that is there is whole."""
    from safetensors.torch import save_file

    name = record_name(prompt["id"])
    with atomic_file(work / f"{name}.safetensors") as tmp:
        save_file({f"c{c.index}": c.codes for c in candidates}, str(tmp), metadata={"id": prompt["id"]})
    write_json_atomic(work / f"{name}.json", {
        "id": prompt["id"], "fingerprint": fingerprint(prompt), "codes": f"{name}.safetensors",
        "candidates": [{"index": c.index, "seed": c.seed, "scores": c.scores} for c in candidates]})


def check_settings(work: Path, settings: dict) -> None:
    """The work folder belongs to one generation setting: a rerun with other settings would mix candidates
    of two models (or seeds, or scorers) in one set of pairs."""
    path = work / SETTINGS
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings, indent=2)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrefsError(f"{path} cannot be read ({e}); delete the folder {work.parent} to build anew") from None
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        raise PrefsError(f"--out {work.parent} holds candidates built with other settings ({', '.join(changed)}: "
                         f"{', '.join(f'{old.get(k)!r} then, {settings.get(k)!r} now' for k in changed)}); "
                         f"give another --out, or delete it to build anew")


# --- pairs from the records ------------------------------------------------------------------------------

def judge(record: dict, config: RewardConfig) -> tuple[list[dict], object]:
    """A prompt's candidates with their reward and rejections, and the pair chosen among them."""
    judged = [{**c, "reward": reward(c["scores"], config.weights), "frames": c["scores"]["frames"],
               "rejections": rejections(c["scores"], config.filters)} for c in record["candidates"]]
    return judged, choose_pair(judged, config.filters)


def pair_line(prompt: dict, chosen: dict, rejected: dict) -> dict:
    line = {"id": prompt["id"], "text": prompt["text"]}
    if prompt.get("reference_audio"):
        line["ref_audio"], line["ref_text"] = str(Path(prompt["reference_audio"]).resolve()), prompt["reference_text"]
    for key in ("speaker", "language"):
        if prompt.get(key):
            line[key] = prompt[key]
    return {**line, "chosen": chosen, "rejected": rejected}


def assemble(out: Path, prompts: list[dict], config: RewardConfig, header: dict) -> dict:
    """candidates.jsonl, unpaired.jsonl, then pairs.jsonl, codes/ and prefs.json (data/preferences.py
    ``write_pairs``) from the work records (rank 0, once every prompt is done). Pairs are chosen here, from
    the recorded scores: -> the counts."""
    import shutil

    from safetensors import safe_open

    from higgs_ddp.data.preferences import CODES, HEADER, write_pairs

    work = out / WORK
    (out / HEADER).unlink(missing_ok=True)  # written last: until then the reader refuses the folder
    pairs, candidates, unpaired, codes = [], [], [], {}
    for prompt in prompts:
        record = read_record(work, prompt)
        if record is None:
            raise PrefsError(f"--out {out}: the candidates of prompt {prompt['id']!r} are missing from {work} "
                             f"(a rank stopped before it?); run the same command again to finish")
        judged, choice = judge(record, config)
        role = {choice.chosen: "chosen", choice.rejected: "rejected"}
        for c in judged:
            candidates.append({"id": prompt["id"], "index": c["index"], "seed": c["seed"],
                               "key": f"{prompt['id']}/c{c['index']}", "reward": c["reward"],
                               "role": role.get(c["index"]), "rejections": c["rejections"], **c["scores"]})
        if choice.chosen is None:
            unpaired.append({"id": prompt["id"], "line": prompt["line"], "text": prompt["text"], "why": choice.why,
                             "rewards": [c["reward"] for c in judged]})
            continue
        ends = {}
        with safe_open(str(work / record["codes"]), framework="pt") as f:
            for which, i in (("chosen", choice.chosen), ("rejected", choice.rejected)):
                key = f"{prompt['id']}/c{i}"
                codes[key] = f.get_tensor(f"c{i}").numpy()
                ends[which] = {"key": key, "seed": judged[i]["seed"], "reward": judged[i]["reward"],
                               "stopped": bool(judged[i]["scores"]["stopped"])}  # a cut one is not taught to end
        pairs.append(pair_line(prompt, ends["chosen"], ends["rejected"]))
    for name, lines in (("candidates.jsonl", candidates), ("unpaired.jsonl", unpaired)):
        write_text_atomic(out / name, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    counts = {"prompts": len(prompts), "pairs": len(pairs), "unpaired": len(unpaired)}
    shutil.rmtree(out / CODES, ignore_errors=True)  # an earlier build's shards: write_pairs adds, never removes
    write_pairs(out, {**header, "counts": counts}, pairs, codes, SHARD_PAIRS * 2)
    return counts


# --- the build -------------------------------------------------------------------------------------------

def build(args) -> dict:
    """Everything after the arguments are parsed, on every rank; -> the counts (rank 0), {} elsewhere."""
    from higgs_ddp.runtime.distributed import all_gather_objects, barrier, setup_distributed
    from higgs_ddp.runtime.shared_fs import check_shared_directory

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_audio_seconds=args.max_audio_seconds, seed=args.seed)
    sampling.check(flag_name)
    if args.candidates < 2:
        raise PrefsError(f"--candidates must be >= 2 (a pair needs two), got {args.candidates}")
    config = RewardConfig(
        Weights(cer=args.cer_weight, wer=args.wer_weight, sim=args.sim_weight, stop=args.stop_weight,
                silence=args.silence_weight, rate=args.rate_weight, clip=args.clip_weight),
        Filters(max_cer=args.max_cer, min_sim=args.min_sim, must_stop=not args.chosen_may_hit_limit,
                max_silence=args.max_silence, min_margin=args.min_margin))
    config.check()
    prompts = read_prompts(args.prompts)
    rates = _corpus_rates(args, prompts)
    found, skipped = find_scorers(args)  # before the model loads (minutes): a missing scorer fails at once
    _check_audio(args.prompts, prompts, bool(found["speaker_model"]))
    env = setup_distributed()
    check_shared_directory(args.out, "--out", env)  # every rank writes its prompts' records there
    for flag, why in skipped.items() if env.is_main else ():
        print(f"higgs-ddp prefs: note: {flag} skipped (--scorers available): {why}", file=sys.stderr, flush=True)
    settings = {"model": str(Path(args.model).resolve()), "candidates": args.candidates,
                "sampling": asdict(sampling), "scorers": found, "language": args.language}
    work = args.out / WORK
    if env.is_main:
        check_settings(work, settings)
    barrier()
    if not env.is_main:
        check_settings(work, settings)  # rank 0 wrote it: every rank reads the same verdict
    mine = prompts[env.rank::env.world_size]  # by position: no rank waits to learn what another has done
    todo = [p for p in mine if read_record(work, p) is None]
    done = sum(all_gather_objects(len(mine) - len(todo)))
    if env.is_main:
        print(f"prefs build: {len(prompts)} prompts x {args.candidates} candidates on {env.world_size} "
              f"rank{'s' * (env.world_size > 1)}" + (f"; {done} already built in {work}" if done else ""), flush=True)
    if todo:
        _generate(args, env, todo, sampling, found, work)
    barrier()
    if not env.is_main:
        return {}
    header = {**_header(args, prompts, sampling, config, found, skipped), **read_identity(work)}
    if rates is not None:  # where the speaking rates of prompts without one came from
        header["speaking_rates"] = {"from": str(args.rates_from), "speakers": rates.rates, "clips": rates.clips}
    counts = assemble(args.out, prompts, config, header)
    print(f"prefs build: {counts['pairs']} pairs from {counts['prompts']} prompts; {counts['unpaired']} "
          f"without a valid pair (listed in {args.out / 'unpaired.jsonl'} with why); {args.out / 'pairs.jsonl'}",
          flush=True)
    return counts


def _corpus_rates(args, prompts: list):
    """--rates-from: each speaker's rate measured in the manifest, given to the prompts without one (in
    place, before their fingerprints are taken) -> the CorpusRates, or None without the option."""
    if args.rates_from is None:
        return None
    from higgs_ddp.evaluation.speaking_rate import corpus_rates, fill_rates

    rates = corpus_rates(args.rates_from)
    given, unknown = fill_rates(prompts, rates)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"prefs build: speaking rates of {rates.describe()}; {given} prompt(s) take their speaker's"
              + (f"; not in it: speaker(s) {', '.join(map(repr, unknown[:5]))}"
                 + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "") + " (no rate term for their prompts)"
                 if unknown else ""), flush=True)
    return rates


def _check_audio(path: Path, prompts: list, with_speaker: bool) -> None:
    """Every reference and speaker clip read once before the model loads: a wrong path fails at once."""
    from higgs_ddp.data.audio import AudioProblem, read_audio
    from higgs_ddp.evaluation.generation import read_reference

    for p in prompts:
        if p.get("reference_audio"):
            read_reference(p["reference_audio"], f"{path}:{p['line']}: ref_audio", 0, 0)
        if p.get("speaker_audio") and with_speaker:
            try:
                read_audio(Path(p["speaker_audio"]), p["speaker_audio"], 0.0)
            except AudioProblem as e:
                raise PrefsError(f"{path}:{p['line']}: speaker_audio: {e}") from None


def _generate(args, env, todo: list, sampling: Sampling, found: dict, work: Path):
    """This rank's unfinished prompts, each recorded as it finishes."""
    from tqdm import tqdm

    from higgs_ddp.evaluation.candidates import generate_candidates
    from higgs_ddp.evaluation.generation import check_codec, reference_codes
    from higgs_ddp.tools.inference import load_for_inference

    device = args.device or (env.device if env.world_size > 1 else None)
    loaded = load_for_inference(args.model, device)
    check_codec(loaded.model, loaded.codec)
    write_json_atomic(work / IDENTITY, identity(args, loaded), indent=2)  # every rank: the same words
    if env.is_main:
        print(f"prefs build: candidates from {loaded.describe()}", flush=True)
    scorer = make_scorer(found, args.language, loaded.device)
    share = "prompts" if env.world_size == 1 else f"rank 0's prompts of {env.world_size} ranks"
    for prompt in tqdm(todo, disable=not env.is_main, unit="prompt", desc=f"candidates ({share})",
                       dynamic_ncols=True):
        what = f"{args.prompts}:{prompt['line']}"
        ref_codes = None
        if prompt.get("reference_audio"):  # conditioned as the model's run conditioned its training audio
            ref_codes = reference_codes(loaded.cfg, loaded.codec, prompt["reference_audio"], f"{what}: ref_audio")
        candidates = generate_candidates(loaded, prompt, args.candidates, sampling, args.seed, scorer, ref_codes, what)
        write_record(work, prompt, candidates)


def identity(args, loaded) -> dict:
    """What the pairs' codes and tokens belong to (the reader checks these against its run): the model's
    codec, codebooks and tokenizer, and which weights generated the candidates."""
    from higgs_ddp.data.preferences import run_identity

    cfg, mc = loaded.cfg, loaded.model.config
    return {**run_identity(cfg.data.codec, cfg.data.codec_revision, loaded.tokenizer, mc.audio_num_codebooks,
                           mc.audio_codebook_size),
            "model": {"path": str(args.model), "kind": loaded.kind, "source": str(loaded.source),
                      "step": loaded.step}}


def read_identity(work: Path) -> dict:
    """The identity the ranks wrote when they loaded the model (this run, or the one that generated the
    candidates: a rerun with every prompt done loads nothing)."""
    try:
        return json.loads((work / IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PrefsError(f"{work / IDENTITY} is missing or unreadable; delete {work.parent} and build "
                         f"anew") from None


def _header(args, prompts, sampling: Sampling, config: RewardConfig, found: dict, skipped: dict) -> dict:
    """prefs.json, less the model's identity: how the pairs were made."""
    return {"reward": config.as_dict(), "candidates": args.candidates, "seed": args.seed,
            "sampling": asdict(sampling), "prompts": str(args.prompts),
            "scorers": {"used": {k: v for k, v in found.items() if v}, "skipped": skipped,
                        "detectors": ["stopped", "silence_fraction", "chars_per_second", "clipped_fraction",
                                      "invalid_codes"]}}


# --- the command line ------------------------------------------------------------------------------------

def _threshold(text: str):
    """A number, or none (no such rule)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or none, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    d, w, f = Sampling(), Weights(), Filters()
    top = argparse.ArgumentParser(prog="higgs-ddp prefs", description=__doc__, epilog=LAUNCH_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="action", required=True, help="build: candidates, scores and pairs")
    p = sub.add_parser("build", description=__doc__, epilog=LAUNCH_HELP, help="candidates, scores and pairs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path,
                   help="a run folder, a checkpoint, a run's final/, an adapter export or a merged export")
    p.add_argument("--prompts", required=True, type=Path, help="JSONL: one {text, id?, ref_audio?, ref_text?, "
                                                               "speaker_audio?, ...} per line")
    p.add_argument("--candidates", type=int, default=6, help="candidates per prompt, K (default %(default)s, "
                                                             "as NeMo Magpie-TTS)")
    p.add_argument("--out", required=True, type=Path, help="the folder of the pairs (see above)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed: candidate i of prompt P is seeded "
                   "from (seed, P's id, i) (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(default %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="(default %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="(default: none)")
    p.add_argument("--max-audio-seconds", type=float, default=20.0,
                   help="length limit: a candidate that reaches it did not stop by itself (default %(default)s)")
    p.add_argument("--asr-model", default=DEFAULT_ASR, help="Whisper for WER/CER: a folder or a hub id in the "
                   "Hugging Face cache; none: no ASR (default %(default)s)")
    p.add_argument("--speaker-model", default=DEFAULT_SPEAKER, help="speaker similarity: a WavLMForXVector "
                   "folder or cached hub id, or resemblyzer; none: no similarity (default %(default)s)")
    p.add_argument("--scorers", choices=("all", "available"), default="all",
                   help="all: a scorer whose weights are not here is an error saying what to get; available: "
                        "build with the ones that are here (the detectors always are) and record in prefs.json "
                        "which were used and which skipped (default %(default)s)")
    p.add_argument("--language", default="en", help="of prompts without their own (default %(default)s)")
    for name, help_ in (("cer", "CER"), ("wer", "WER"), ("sim", "speaker similarity (gained)"),
                        ("stop", "hitting the length limit"), ("silence", "the silence fraction"),
                        ("rate", "|ln(chars/s / the prompt's speaking_rate)|"), ("clip", "the clipped fraction")):
        p.add_argument(f"--{name}-weight", type=float, default=getattr(w, name),
                       help=f"reward weight of {help_} (default %(default)s)")
    p.add_argument("--max-cer", type=_threshold, default=f.max_cer,
                   help="a chosen candidate's highest CER, where measured; none: no rule (default %(default)s)")
    p.add_argument("--min-sim", type=_threshold, default=f.min_sim,
                   help="a chosen candidate's lowest speaker similarity, where measured (default: none)")
    p.add_argument("--max-silence", type=float, default=f.max_silence,
                   help="a chosen candidate's highest silence fraction (default %(default)s)")
    p.add_argument("--chosen-may-hit-limit", action="store_true",
                   help="let a candidate that hit --max-audio-seconds be chosen (default: it must stop by itself)")
    p.add_argument("--min-margin", type=float, default=f.min_margin,
                   help="the chosen's reward must exceed the rejected's by more than this (default %(default)s)")
    p.add_argument("--rates-from", type=Path, metavar="MANIFEST",
                   help="a manifest of the speakers' own clips: each speaker's characters per second (the median "
                        "of their clips, from the audio headers) is the speaking_rate of the prompts that name the "
                        "speaker and give none (default: only the prompts' own)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: each rank's GPU when there is one)")
    return top


def main(argv=None) -> int:
    from higgs_ddp.runtime.distributed import cleanup

    args = parser().parse_args(argv)
    try:
        build(args)
    except HiggsError as e:  # and only that: a ValueError from torch is a bug, with its traceback
        if int(os.environ.get("RANK", 0)) == 0:  # every rank reads the same input: one line, not one per rank
            return report(e)
        return 2
    finally:
        cleanup()
    return 0
