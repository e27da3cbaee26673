from setuptools import find_packages, setup

setup(
    name="higgs-ddp",
    version="0.1.0",
    description="Correct, fast distributed fine-tuning for Higgs Audio v2",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.11",
    install_requires=[
        # torch and torchaudio must be the same release (torchaudio wheels are built against one torch).
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "torchvision==0.26.0",  # boson-multimodal imports it; pinned to the matching release
        "boson-multimodal==0.1.1",
        "transformers>=4.45.1,<4.47",  # what boson-multimodal 0.1.1 supports
        "peft>=0.13,<0.22",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",
        "numpy",
        "soundfile",
        "pyloudnorm==0.2.0",  # data.audio.loudness_lufs: ITU-R BS.1770 loudness
        "pyarrow>=15",  # manifest import --format hf: datasets' Arrow/Parquet files (data/hf_tables.py: why not datasets)
        "matplotlib",  # python -m higgs_ddp.plot
        "tensorboard",  # logging.tensorboard
        # eval.asr_model: WER/CER as Seed-TTS-eval scores it (jiwer; zhon's CJK punctuation; zhconv for zh)
        "jiwer>=4,<5",
        "zhon>=2",
        "zhconv>=1.4",
        "torchao==0.18.0",  # model.quantize=nf4 (its NF4 tensor; quantize.py), train.optimizer=adamw8bit (training/optim.py)
    ],
    # voice: eval.speaker_model=resemblyzer, a speaker encoder whose weights come inside the wheel (offline)
    extras_require={"test": ["pytest>=8"], "voice": ["resemblyzer==0.1.4"]},
    entry_points={"console_scripts": ["higgs-ddp = higgs_ddp.cli:console"]},
)
