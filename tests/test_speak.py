"""higgs-ddp speak and tools.inference.load_for_inference, on a tiny LoRA run trained here for two steps:
every kind of model path loads the same weights and speaks the same codes; bad input is one line, exit 2."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config

from higgs_ddp.tools.inference import ModelPathError, load_for_inference, model_kind


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA run of two steps (a checkpoint after each), its adapter export and its merged export."""
    from higgs_ddp.tools.export import export
    from higgs_ddp.train import train

    tmp = tmp_path_factory.mktemp("speak")
    cfg = tiny_config(tmp, "train.max_steps=2", "train.lr=1e-2", "train.warmup_steps=1", "train.save_every=1",
                      samples=4, audio=True)
    train(cfg)
    run = tmp / "run"
    export(run, tmp / "adapter")
    export(run, tmp / "merged", merge=True)
    return tmp


def weights(path):
    return load_for_inference(path, device="cpu").model.state_dict()


def test_every_kind_of_model_path_loads_the_same_weights(trained):
    run = trained / "run"
    want = load_for_inference(run)
    assert (want.kind, want.source, want.step) == ("final", run / "final", 2)  # the run finished
    assert not want.model.training and not any(p.requires_grad for p in want.model.parameters())
    assert type(want.model).__name__ == "HiggsAudioModel"  # no peft wrapper left
    assert want.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    ref = want.model.state_dict()
    for path, kind in [(run / "checkpoints" / "step_000002", "checkpoint"), (trained / "adapter", "adapter export"),
                       (trained / "merged", "merged")]:
        loaded = load_for_inference(path, device="cpu")
        assert (loaded.kind, loaded.step, loaded.cfg.data.codec) == (kind, 2, "tiny"), path
        got = loaded.model.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k].cpu()) for k in ref), path
    # Negative control: the step-1 checkpoint holds other weights, so the comparison above can fail.
    older = weights(run / "checkpoints" / "step_000001")
    assert any(not torch.equal(older[k], ref[k].cpu()) for k in ref)


def test_a_run_that_did_not_finish_speaks_from_its_latest_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "stopped"}))
    shutil.rmtree(run / "checkpoints" / "step_000002")  # final/ is from an earlier, finished run
    loaded = load_for_inference(run, device="cpu")
    assert (loaded.kind, loaded.step) == ("checkpoint", 1)


def test_a_path_of_no_accepted_kind_is_one_line(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, words in [(tmp_path / "nope", "not found"), (tmp_path / "empty", "is none of"),
                        (tmp_path / "file.txt", "is a file")]:
        with pytest.raises(ModelPathError, match=words) as e:
            load_for_inference(path, device="cpu")
        assert "\n" not in str(e.value)
    assert model_kind(trained / "run") == "run" and model_kind(trained / "run" / "final") == "final"
