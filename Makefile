# Every target sets itself up: a fresh clone needs only python3 (3.11 or 3.12).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
GPUS   ?= 1
CONFIG ?= configs/tiny.yaml
ARGS   ?=
RESTARTS ?= 0
WHEELS ?= wheels
PYVER  ?= 3.12

# make demo: 2 processes, or 1 on a machine with a single GPU (one process per GPU)
DEMO_PROCS ?= $(shell [ "$$(nvidia-smi -L 2>/dev/null | wc -l)" = 1 ] && echo 1 || echo 2)
# make demo on top of configs/tiny.yaml (the tests use it as it is), so that what the model speaks shows what it
# learned, how long a text lasts: 160 clips (the tests write 48), 800 steps, and LoRA on the output heads too: on a
# random base with frozen heads the adapters never made a code or the stop confident (without: 0.04 s for 37 characters)
DEMO_SAMPLES ?= 160
DEMO_ARGS ?= train.max_steps=800 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,audio_lm_head,text_lm_head]'
# two texts of the corpus's words that are not in it, a short one and a long one
DEMO_TEXTS ?= "seven birds" "small birds sing at dawn"
# make bench: the full 3B architecture where a GPU is visible, the tiny model otherwise
BENCH_CONFIG ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo configs/bench_3b.yaml || echo configs/bench_tiny.yaml)

.PHONY: install wheels install-offline demo demo-data gpu-acceptance prepare train bench smoke-3b test test-all test-fast clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,voice]'
	touch $(STAMP)

wheels: install  ## make wheels [PYVER=3.12]: where PyPI is reachable, fetch into wheels/ only what the GPU image lacks (<= 48 MiB, printed)
	launch/fetch_wheels.sh $(WHEELS) $(PYVER)

install-offline:  ## on such a GPU machine: .venv from wheels/ over its own torch/torchaudio [PYTHON=python3]
	PYTHON=$(PYTHON) launch/install_offline.sh $(WHEELS)

demo: demo-data  ## tiny random HiggsAudioModel, 2 CPU processes: LJSpeech-style WAVs -> import -> tiny codec -> training -> speak, ~2 min
	rm -rf runs/tiny/checkpoints runs/tiny/tensorboard runs/tiny/samples runs/tiny/speak  # a demo starts over; a real run resumes
	$(VENV)/bin/higgs-ddp train --nproc-per-node $(DEMO_PROCS) --config configs/tiny.yaml $(DEMO_ARGS) $(ARGS)
	$(VENV)/bin/higgs-ddp plot runs/tiny
	printf '%s\n' $(DEMO_TEXTS) > runs/tiny/speak.txt
	$(VENV)/bin/higgs-ddp speak --model runs/tiny --text-file runs/tiny/speak.txt --max-audio-seconds 4 --out runs/tiny/speak
	$(VENV)/bin/higgs-ddp demo-data runs/tiny/data --compare runs/tiny/speak

demo-data: install  ## the demo's corpus in runs/tiny/data, which configs/tiny.yaml reads (make demo, make gpu-acceptance) [DEMO_SAMPLES=160]
	$(VENV)/bin/higgs-ddp demo-data runs/tiny/data --samples $(DEMO_SAMPLES)
	$(VENV)/bin/higgs-ddp manifest import --format ljspeech runs/tiny/data --out runs/tiny/data/manifest.jsonl --speaker tones

gpu-acceptance:  ## on a lent GPU, first thing: installs from wheels/ if needed, then <= 8 min, most valuable first, results in $$OUT
	launch/gpu_acceptance.sh

prepare: install  ## make prepare GPUS=8 CONFIG=...: encode the audio into the code cache (training does it too)
	$(VENV)/bin/higgs-ddp prepare --nproc-per-node $(GPUS) --config $(CONFIG) $(ARGS)

train: install  ## make train GPUS=8 CONFIG=configs/higgs_v2_3b_lora.yaml ARGS="train.lr=1e-4" [RESTARTS=3]
	$(VENV)/bin/higgs-ddp train --nproc-per-node $(GPUS) --max-restarts $(RESTARTS) --config $(CONFIG) $(ARGS)

bench: install  ## make bench [BENCH_CONFIG=configs/bench_3b.yaml] [ARGS="bench.seq_len=4096"]: last line is JSON
	$(VENV)/bin/higgs-ddp bench --config $(BENCH_CONFIG) $(ARGS)

smoke-3b: install  ## the 5.8B architecture end to end on this CPU (needs ~15 GB free RAM, ~25 GB disk, ~30 min; a rerun reuses the built model)
	$(VENV)/bin/higgs-ddp smoke --config configs/bench_3b.yaml --out runs/smoke_3b $(ARGS)

test: install
	$(PY) -m pytest tests

test-all: install  ## everything but the full-size smoke: make test plus the extended variants (~10 min more)
	$(PY) -m pytest tests -m "not smoke"

test-fast: install  ## everything but the tests marked slow
	$(PY) -m pytest tests -m "not slow and not smoke and not extended"

clean:
	rm -rf runs .pytest_cache
