"""The GPU acceptance plan fits its budget, most valuable step first, and `make wheels` carries only what the GPU image lacks.

launch/gpu_acceptance.sh --dry-run prints each step, its limit and what it gets in the worst case (every
step before it using its whole limit); launch/fetch_wheels.sh --list prints the wheels it would fetch.
Both run here without a GPU or a registry.
"""

import dataclasses
import re
import subprocess

from helpers import ROOT

from higgs_ddp.config import Config

ORDER = ["preflight", "cuda_tests", "tiny_bf16", "lora_5.8b", "nf4_lora", "largest_mb", "full_1gpu"]


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
    runs = [worst_case(r) for r in rows]
    assert sum(s for s in runs if s) <= 480  # 8 minutes, whatever each step takes
    assert runs[:4] == [30, 80, 120, 120]  # the CUDA tests, the tiny run and the LoRA row get their whole limit
    # The NF4 row only where model.quantize exists; the full fine-tuning row gets what is left, which is below its
    # minimum in the worst case once the NF4 row runs (it runs when the steps before it finish early)
    has_quantize = "quantize" in {f.name for f in dataclasses.fields(Config().model)}
    assert runs[-1] == (None if has_quantize else 70)
    assert "bench.build_on_device=true" in (ROOT / "launch" / "gpu_acceptance.sh").read_text()
    nf4 = " ".join(rows[ORDER.index("nf4_lora")])
    assert ("skip: model.quantize is not in this version's config" in nf4) != has_quantize
    # A smaller budget: later steps are cut to what is left, and skipped below their minimum.
    small = [worst_case(r) for r in plan(budget=250)]
    assert small[:3] == [30, 80, 120] and small[3] is None and sum(s for s in small if s) <= 250


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
