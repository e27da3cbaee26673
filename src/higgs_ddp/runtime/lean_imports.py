"""Keep transformers from importing image and quantization libraries that no path of ours uses.

transformers 4.46 imports torchvision (image transforms for its object-detection losses), scipy.optimize
(the same losses) and torchao with triton (its own quantizers) as soon as ``modeling_utils`` loads, simply
because they are installed: about 4 of the 10 CPU seconds it takes a process to import HiggsAudioModel on
a 2-core machine, paid by every rank, every DataLoader-free start and every CLI call. boson-multimodal
never calls them; our NF4 and 8-bit optimizer import torchao themselves, which this does not touch.
"""

_UNUSED = ("torchvision", "scipy", "torchao")


def trim_transformers() -> None:
    """Call before the first import of a transformers model class; later calls cost nothing."""
    import transformers.utils.import_utils as available

    for name in _UNUSED:
        if hasattr(available, f"_{name}_available"):  # another transformers may name them otherwise
            setattr(available, f"_{name}_available", False)


def peft_probes_torchao_only_when_loaded() -> None:
    """peft (0.17+) imports torchao, and with it torch._dynamo and triton (~4 CPU s), on every LoRA wrap just
    to ask whether a base weight is one of torchao's tensors. No weight can be one unless torchao is already
    imported (our NF4 base is even rounded after the wrap), so the probe first asks ``sys.modules``."""
    import sys

    try:
        import peft.tuners.lora.torchao as probe
    except ImportError:  # a peft without torchao support has nothing to probe
        return
    original = getattr(probe, "is_torchao_available", None)
    if original is None or getattr(original, "lean", False):
        return

    def loaded_and_available() -> bool:
        return "torchao" in sys.modules and original()

    loaded_and_available.lean = True
    probe.is_torchao_available = loaded_and_available
