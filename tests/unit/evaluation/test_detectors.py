"""The cheap detectors find silence, a tone, clipping, a clip cut short and one that never stopped.

The cheap detectors on synthetic clips with known answers: silence, a tone, a clipped tone, a clip cut
short, a clip that never stopped."""

import numpy as np
import pytest

from higgs_ddp.evaluation.detectors import (
    check_clip, clipped_fraction, frame_dbfs, silence_fraction, spoken_characters, summarize, warnings_for)

SR = 16000


def tone(seconds, amplitude=0.5, freq=250.0):  # whole periods in a 20 ms frame
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_frame_energy_in_dbfs():
    # a full-scale sine has RMS 1/sqrt(2): -3.01 dBFS; half scale -9.03
    assert frame_dbfs(tone(0.1, 1.0), SR) == pytest.approx(np.full(5, -3.0103), abs=0.05)
    assert frame_dbfs(tone(0.1, 0.5), SR) == pytest.approx(np.full(5, -9.0309), abs=0.05)


def test_silence_fraction_relative_to_the_peak_and_under_the_floor():
    assert silence_fraction(np.zeros(SR, np.float32), SR) == 1.0
    assert silence_fraction(np.zeros(0, np.float32), SR) == 1.0  # nothing to hear
    assert silence_fraction(tone(1.0), SR) == 0.0
    # half speech, half pause: 25 of 50 frames are 60 dB under the peak
    half = np.concatenate([tone(0.5), 1e-3 * tone(0.5)])
    assert silence_fraction(half, SR) == pytest.approx(0.5)
    # a steady hum at -70 dBFS: nothing is quiet relative to its own peak, all of it is under the floor
    hum = tone(1.0, amplitude=10 ** (-67 / 20))
    assert silence_fraction(hum, SR) == 1.0
    assert silence_fraction(hum, SR, floor_dbfs=-100.0) == 0.0  # negative control: the floor is what caught it
    # a pause 30 dB down is still speech-level by both thresholds
    assert silence_fraction(np.concatenate([tone(0.5), 10 ** (-30 / 20) * tone(0.5)]), SR) == 0.0


def test_clipping_and_speaking_rate():
    clean, loud = tone(1.0, 0.9), np.clip(tone(1.0, 2.0), -1.0, 1.0)
    assert clipped_fraction(clean) == 0.0
    # |2 sin| reaches full scale wherever |sin| >= 0.4995: 2/3 of a period (42 of its 64 samples here)
    assert clipped_fraction(loud) == pytest.approx(1 - 2 * np.arcsin(0.4995) / np.pi, abs=0.02)
    assert spoken_characters("Hello, world! 你好") == 12
    text = "The quick brown fox jumps over the lazy dog."  # 35 letters
    normal = check_clip(tone(2.5), SR, text, hit_limit=False)
    assert normal.chars_per_second == pytest.approx(14.0) and normal.stopped and not normal.silent
    cut = check_clip(tone(0.5), SR, text, hit_limit=False)  # truncated: five times too fast
    assert cut.chars_per_second == pytest.approx(70.0) and cut.seconds == pytest.approx(0.5)
    assert check_clip(np.zeros(0, np.float32), SR, text, hit_limit=False).chars_per_second is None


def test_summary_and_warnings_for_silent_and_endless_samples():
    text = "hello there"
    good = [check_clip(tone(1.0), SR, text, hit_limit=False) for _ in range(3)]
    silent = [check_clip(np.zeros(SR, np.float32), SR, text, hit_limit=False) for _ in range(3)]
    endless = [check_clip(tone(1.0), SR, text, hit_limit=True) for _ in range(3)]
    assert warnings_for(summarize(good)) == []
    s = summarize(silent + good[:1])
    assert (s["samples"], s["silent_samples"], s["stopped_samples"]) == (4, 3, 4)
    assert s["silence_fraction"] == pytest.approx(0.75)
    (line,) = warnings_for(s)
    assert line.startswith("3 of 4 listening samples are silent")
    (line,) = warnings_for(summarize(endless + good[:1]))
    assert line.startswith("3 of 4 listening samples never stopped")
    # half is not most: no warning
    assert warnings_for(summarize(silent[:1] + endless[:1] + good[:2])) == []
