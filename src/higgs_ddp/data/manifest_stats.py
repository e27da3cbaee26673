"""What a manifest holds, from the audio headers only: clips, hours, per-speaker hours, a duration
histogram, text lengths, sample rates, and the warnings a user needs before training on it.

The clips counted are the ones a sample learns to speak (references are context, not training audio).
Lines or files the training data check would refuse are counted and listed, the same reasons and words.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from boson_multimodal.data_types import AudioContent, TextContent

from higgs_ddp.data.audio import AudioProblem, DurationRule, check_header
from higgs_ddp.data.manifest import Problem, read_manifest

BINS = (1, 2, 5, 10, 15, 20, 30, 60)  # seconds: the histogram's upper edges (and one bin beyond)
FRAMES_PER_SECOND = 25  # the Higgs audio tokenizer's frame rate: the token estimate of a clip
TEXT_CHARS_PER_TOKEN = 3  # a cautious guess for Llama-3's tokenizer on English text (about 4 on average)
PROMPT_TOKENS = 40  # the system prompt, role headers and audio markers around each sample (tokenised ~30)
LITTLE_AUDIO_HOURS = 0.5  # below this a voice fine-tune is thin; said as a warning, never refused
DOMINANT_SHARE = 0.8  # one speaker holding more of the audio than this


@dataclass
class Stats:
    manifest: str
    samples: int = 0
    seconds: float = 0.0
    codes_only: int = 0  # clips given as .npy codes: no duration from a header
    by_speaker: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))  # speaker -> [clips, s]
    durations: list = field(default_factory=list)
    text_chars: list = field(default_factory=list)
    rates: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)
    too_long: list = field(default_factory=list)  # (where, seconds)
    over_budget: list = field(default_factory=list)  # (where, estimated positions)
    warnings: list = field(default_factory=list)


def _spoken_text(entry) -> str:
    """The text of the user turn before the first learned audio: what that clip says."""
    target = next(i for i, ref in enumerate(entry.audio) if ref is entry.learned[0])
    text, seen = "", 0
    for m in entry.chatml.messages:
        items = m.content if isinstance(m.content, list) else [m.content]
        if m.role == "user":
            text = " ".join(c if isinstance(c, str) else c.text for c in items if isinstance(c, (str, TextContent)))
        seen += sum(isinstance(c, AudioContent) for c in items)
        if seen > target:
            break
    return text


def manifest_stats(path: str, max_audio_seconds: float = 30.0, max_tokens_per_batch: int = 0,
                   rule: Optional[DurationRule] = None, codec_unknown: str = "") -> Stats:
    """``rule``: the run's duration limits (DurationRule.of the config); a clip they refuse is a problem, as
    in training, except one longer than ``max_audio_seconds``: counted, and warned about. ``codec_unknown``:
    why the codec's shortest input is not known here (then not checked, and said)."""
    entries, problems = read_manifest(path)
    st = Stats(path, problems=list(problems))
    rule = dataclasses.replace(rule or DurationRule(), max_seconds=0.0)  # long clips are counted below
    checked: dict = {}
    for e in entries:
        if not e.learned:
            continue
        seconds, failed = 0.0, None
        for ref in e.learned:
            if ref.is_codes:
                st.codes_only += 1
                continue
            if ref.path not in checked:
                try:
                    checked[ref.path] = check_header(ref.path, ref.shown, rule=rule)
                except AudioProblem as err:
                    checked[ref.path] = err
            info = checked[ref.path]
            if isinstance(info, AudioProblem):
                failed = Problem(e.where, info.reason, str(info))
                break
            seconds += info.frames / info.samplerate
            st.rates[int(info.samplerate)] += 1
            if max_audio_seconds and info.frames / info.samplerate > max_audio_seconds:
                st.too_long.append((e.where, info.frames / info.samplerate))
        if failed:
            st.problems.append(failed)
            continue
        text = _spoken_text(e)
        st.samples += 1
        st.seconds += seconds
        st.durations.append(seconds)
        st.text_chars.append(len(text))
        spk = st.by_speaker[e.speaker or "(no speaker)"]
        spk[0] += 1
        spk[1] += seconds
        estimate = math.ceil(seconds * FRAMES_PER_SECOND) + len(text) // TEXT_CHARS_PER_TOKEN + PROMPT_TOKENS
        if max_tokens_per_batch and estimate > max_tokens_per_batch:
            st.over_budget.append((e.where, estimate))
    st.warnings = _warnings(st, max_audio_seconds, max_tokens_per_batch)
    if codec_unknown and st.samples:
        st.warnings.append(f"clips too short for the codec are not checked: {codec_unknown}")
    return st


def run_duration_rule(data) -> tuple:
    """-> (the run's DurationRule for config section ``data``, why the codec's shortest input is unknown or
    ""). From this machine alone: a hub codec never downloaded leaves that limit unchecked, and said."""
    from higgs_ddp.data.codec import CodecError, local_min_input_seconds

    try:
        codec_min = local_min_input_seconds(data.codec, data.codec_revision)
    except (CodecError, KeyError, TypeError, ValueError) as e:  # no config, or one the encoder cannot be built from
        return DurationRule.of(data, 0.0), f"data.codec={data.codec}: {type(e).__name__}: {e}"
    if codec_min is None:
        return DurationRule.of(data, 0.0), (f"data.codec={data.codec}'s config.json is not in the Hugging Face "
                                            f"cache (one run with network access fetches it)")
    return DurationRule.of(data, codec_min), ""


def _warnings(st: Stats, max_audio_seconds: float, max_tokens: int) -> list:
    out = []
    hours = st.seconds / 3600
    if st.samples and hours < LITTLE_AUDIO_HOURS:
        out.append(f"little audio: {st.seconds / 60:.1f} min in all; a voice fine-tune on under "
                   f"{LITTLE_AUDIO_HOURS * 60:.0f} min tends to memorise its clips (watch the validation loss)")
    if st.too_long:
        where, s = st.too_long[0]
        out.append(f"{len(st.too_long)} clip(s) longer than data.max_audio_seconds={max_audio_seconds:g}, which "
                   f"the training data check refuses (first: {where}, {s:.1f} s)")
    if st.over_budget:
        where, n = st.over_budget[0]
        out.append(f"{len(st.over_budget)} sample(s) probably longer than data.max_tokens_per_batch={max_tokens} "
                   f"(estimated at {FRAMES_PER_SECOND} codec frames/s plus text; first: {where}, ~{n}); "
                   f"prepare counts them exactly")
    if len(st.by_speaker) > 1 and st.seconds:
        top, (n, s) = max(st.by_speaker.items(), key=lambda kv: kv[1][1])
        if s / st.seconds > DOMINANT_SHARE:
            out.append(f"speaker {top!r} holds {s / st.seconds:.0%} of the audio: the others will be "
                       f"heard little (balance, or fine-tune on {top!r} alone)")
    single = sorted(k for k, (n, _) in st.by_speaker.items() if n == 1 and k != "(no speaker)")
    if single:
        out.append(f"{len(single)} speaker(s) with a single clip (no other clip to pair as a same-speaker "
                   f"reference): {', '.join(single[:5])}{' ...' if len(single) > 5 else ''}")
    if st.problems:
        out.append(f"{len(st.problems)} sample(s) the training data check would refuse (listed above)")
    return out


def histogram(durations: list) -> list:
    """(label, count) per duration bin."""
    edges = (0,) + BINS + (math.inf,)
    counts = Counter(next(i for i in range(len(BINS) + 1) if d < edges[i + 1]) for d in durations)
    return [(f"{edges[i]:g}-{edges[i + 1]:g} s" if edges[i + 1] != math.inf else f">= {edges[i]:g} s", counts[i])
            for i in range(len(BINS) + 1)]


def quantiles(values: list) -> dict | None:
    """{"min", "median", "max"} of ``values`` as numbers (None for none): the table prints them, --json gives them."""
    if not values:
        return None
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


def _quantiles(values: list) -> str:
    q = quantiles(values)
    return "-" if q is None else ", ".join(f"{k} {n:g}" for k, n in q.items())


def render(st: Stats, max_listed: int = 20) -> str:
    lines = [f"{st.manifest}: {st.samples} clip(s), {st.seconds / 3600:.2f} h of audio"
             + (f", {st.codes_only} given as codes (no duration)" if st.codes_only else "")]
    if st.samples:
        lines.append(f"  duration    {_quantiles([round(d, 2) for d in st.durations])} (s), "
                     f"mean {st.seconds / st.samples:.2f} s")
        lines.append(f"  text        {_quantiles(st.text_chars)} (characters)")
        lines.append("  rates       " + ", ".join(f"{r} Hz: {n}" for r, n in sorted(st.rates.items())))
        lines.append(f"  speakers    {len(st.by_speaker)}")
        for spk, (n, s) in sorted(st.by_speaker.items(), key=lambda kv: -kv[1][1])[:max_listed]:
            lines.append(f"    {spk:<24} {n:>7} clips  {s / 3600:8.3f} h  {s / st.seconds if st.seconds else 0:6.1%}")
        if len(st.by_speaker) > max_listed:
            lines.append(f"    ... and {len(st.by_speaker) - max_listed} more")
        lines.append("  durations")
        peak = max(c for _, c in histogram(st.durations)) or 1
        for label, count in histogram(st.durations):
            lines.append(f"    {label:>10} {count:>7}  {'#' * math.ceil(40 * count / peak)}")
    if st.problems:
        lines.append(f"  problems    {len(st.problems)}")
        lines += [f"    {p}" for p in st.problems[:max_listed]]
        if len(st.problems) > max_listed:
            lines.append(f"    ... and {len(st.problems) - max_listed} more")
    lines += [f"warning: {w}" for w in st.warnings]
    return "\n".join(lines)


def as_json(st: Stats) -> dict:
    return {"manifest": st.manifest, "clips": st.samples, "hours": st.seconds / 3600, "codes_only": st.codes_only,
            "speakers": {k: {"clips": n, "hours": s / 3600} for k, (n, s) in st.by_speaker.items()},
            "histogram": dict(histogram(st.durations)), "text_chars": quantiles(st.text_chars),
            "rates": {str(r): n for r, n in st.rates.items()},
            "problems": [{"where": p.where, "reason": p.reason, "message": p.message} for p in st.problems],
            "warnings": st.warnings}

