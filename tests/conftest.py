"""pytest's hooks and the fixtures shared by every folder: the tokenizer, and the uninterrupted 2-rank reference
runs. The helpers themselves are in helpers.py."""

import pytest

from helpers import FSDP, PREFS_SETTINGS, prefs_inputs, uninterrupted_run, write_config, write_user_config


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (pytest.ini) are skipped where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-acceptance runs these on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from higgs_ddp.data.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


# The uninterrupted 2-rank reference runs that several modules compare with (faults, Slurm, several
# nodes): each runs once per session.
@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """helpers.write_config's run on 2 ranks, uninterrupted. No DataLoader workers: their number changes
    nothing in the batches, so every run compares with it (the Slurm runs have one)."""
    return uninterrupted_run(tmp_path_factory, "uninterrupted", write_config)


@pytest.fixture(scope="session")
def uninterrupted_user_path(tmp_path_factory):
    """helpers.write_user_config's run (the user's whole path) on 2 ranks, uninterrupted."""
    return uninterrupted_run(tmp_path_factory, "uninterrupted_user_path", write_user_config)


@pytest.fixture(scope="session")
def uninterrupted_fsdp(tmp_path_factory):
    """helpers.write_config's run under train.parallel=fsdp (helpers.FSDP) on 2 ranks, uninterrupted."""
    return uninterrupted_run(tmp_path_factory, "uninterrupted_fsdp", lambda tmp, name: write_config(tmp, name, *FSDP))


@pytest.fixture(scope="session")
def prefs_built(tmp_path_factory):
    """``higgs-ddp prefs build`` of helpers.prefs_inputs with PREFS_SETTINGS in this process, on 1 rank ->
    (checkpoint, prompts, out); the unit tests read it and the 2-rank build after a kill compares with it."""
    from higgs_ddp.tools.prefs import main

    tmp = tmp_path_factory.mktemp("prefs")
    ckpt, prompts = prefs_inputs(tmp)
    out = tmp / "out"
    assert main(["build", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out), *PREFS_SETTINGS]) == 0
    return ckpt, prompts, out
