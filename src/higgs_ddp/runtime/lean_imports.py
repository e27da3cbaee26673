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
