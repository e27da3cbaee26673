"""higgs-ddp: correct, fast distributed fine-tuning for Higgs Audio v2."""

__version__ = "0.1.0"
