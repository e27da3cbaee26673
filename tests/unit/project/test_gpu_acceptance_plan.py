"""The GPU acceptance plan fits its budget, most valuable step first, and `make wheels` carries only what the GPU image lacks.

launch/gpu_acceptance.sh --dry-run prints each step, its limit and what it gets in the worst case (every
step before it using its whole limit); launch/fetch_wheels.sh --list prints the wheels it would fetch.
Both run here without a GPU or a registry.
"""

import re
import subprocess

from helpers import ROOT

ORDER = ["install", "preflight", "cuda_tests", "tiny_bf16", "lora_5.8b", "nf4_lora", "largest_mb", "full_1gpu"]


def plan(budget=480) -> list:
    out = subprocess.run(["bash", "launch/gpu_acceptance.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "BUDGET_S": str(budget)})
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line.split()]
    return [r for r in rows if r[0] in ORDER]


def worst_case(row) -> int | None:
    """Seconds the step gets in the worst case; None when it is skipped."""
    text = " ".join(row)
    m = re.search(r"worst case (\d+)s:", text)
    return int(m.group(1)) if m else None


def test_steps_run_most_valuable_first_within_the_budget():
    rows = plan()
    assert [r[0] for r in rows] == ORDER
    runs = dict(zip(ORDER, map(worst_case, rows)))
    assert sum(s for s in runs.values() if s) <= 480  # 8 minutes, the install from wheels/ included
    # On a fresh machine in the worst case (every step before using its whole limit): the install, the CUDA tests,
    # the tiny run and the 5.8B LoRA row get their whole limit, the NF4 row what is left (50 of its 60 s); the
    # largest micro-batch and full fine-tuning run only when the steps before finish early.
    assert list(runs.values()) == [90, 20, 80, 120, 120, 50, None, None]
    script = (ROOT / "launch" / "gpu_acceptance.sh").read_text()
    assert "bench.build_on_device=true" in script and 'out=${1:-${OUT:-' in script and "--partial-row" in script
    # A smaller budget: later steps are cut to what is left, and skipped below their minimum.
    small = [worst_case(r) for r in plan(budget=250)]
    assert small[:4] == [90, 20, 80, 60] and small[4:] == [None] * 4


def test_make_wheels_lists_only_what_the_gpu_image_lacks():
    out = subprocess.run(["bash", "launch/fetch_wheels.sh", "--list", "3.12"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    carried = {line.split("==")[0].lower().replace("_", "-") for line in lines if "==" in line}
    preinstalled = set(lines[-1].removeprefix("# preinstalled (not carried): ").split())
    # The image has torch, torchaudio (CUDA builds), its numeric stack and transformers 5.x's and peft's
    # dependencies; transformers itself must travel: boson-multimodal needs it < 4.47.
    assert {"torch", "torchaudio", "numpy", "safetensors", "pyyaml", "accelerate", "regex"} <= preinstalled
    assert not carried & preinstalled
    assert not any(n.startswith(("nvidia-", "triton")) for n in carried)
    assert {"transformers", "tokenizers", "huggingface-hub", "boson-multimodal", "peft", "torchvision"} <= carried
    # Read from setup.py, not from the installed metadata (which lags a new pin): torchao (NF4, 8-bit AdamW) travels.
    assert "torchao" in carried
    # pyarrow (~40 MiB; only `manifest import --format hf` imports it) is neither carried nor required there.
    optional = lines[-2].removeprefix("# optional (not carried, used where the image has it): ").split()
    assert optional == ["pyarrow"] and "pyarrow" not in carried | preinstalled
