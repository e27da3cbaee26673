"""Cold preparation split over 2 ranks builds the one-process index byte for byte, and a prepare killed between pieces continues to it.

`higgs-ddp prepare --nproc-per-node 2` on a corpus whose codes are cached (file hashes and tokens
forgotten), in pieces of 20 manifest lines (data/piece_prepare.py), against the index the full way writes
in one process. Then a prepare with a pause after each piece (the HIGGS_DDP_TEST_PIECE_PAUSE_S test hook),
killed with SIGKILL once a piece is on disk, and run again: it keeps the finished piece and ends with the
same index.
"""

import shutil
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, TINY, TORCHRUN_ENV, cached_corpus, cached_corpus_overrides, index_files, wait_for

from higgs_ddp.config import load_config
from higgs_ddp.data import piece_prepare
from higgs_ddp.data.dataset import load_data
from higgs_ddp.model import load_tokenizer, model_config
from higgs_ddp.runtime.distributed import DistEnv

pytestmark = pytest.mark.slow

CLIPS, LINES = 120, 20  # 6 pieces, 3 per rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return cached_corpus(tmp_path_factory, "pieces", CLIPS)


def forget(corpus) -> None:
    """Back to a cold start with the codes cached: no index, no pieces, no file hashes, no tokens."""
    cache = corpus / ".higgs_codes"
    shutil.rmtree(cache / "index", ignore_errors=True)
    shutil.rmtree(cache / "tokens", ignore_errors=True)
    (cache / "hashes.json").unlink(missing_ok=True)


def the_index(corpus):
    (folder,) = [p for p in (corpus / ".higgs_codes" / "index").iterdir() if not p.name.endswith(".pieces")]
    return folder


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The full way's index, one process (the command's own tokenizer: the index's key depends on it)."""
    cfg = load_config(str(TINY), cached_corpus_overrides(corpus, tmp_path_factory.mktemp("ref")))
    tokenizer = load_tokenizer(cfg)
    forget(corpus)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(piece_prepare, "applies", lambda cfg: False)
        load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)
    return index_files(the_index(corpus))


def prepare_cmd(corpus, tmp_path, ranks: int) -> list:
    launch = ["--nproc-per-node", str(ranks)] if ranks > 1 else []  # one: this process, no torchrun
    return [sys.executable, "-m", "higgs_ddp", "prepare", *launch, "--config", str(TINY),
            *cached_corpus_overrides(corpus, tmp_path), "data.num_workers=0"]


def run(cmd, **env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**TORCHRUN_ENV, "HIGGS_DDP_PIECE_LINES": str(LINES), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_ranks_prepare_the_one_process_index(corpus, reference, tmp_path):
    forget(corpus)
    out = run(prepare_cmd(corpus, tmp_path, 2))
    assert f"6 piece(s) of up to {LINES} manifest lines on 2 rank(s): 6 built;" in out, out
    assert index_files(the_index(corpus)) == reference
    assert not list((corpus / ".higgs_codes" / "index").glob("*.pieces"))  # joined, then removed


def test_a_prepare_killed_between_pieces_continues_to_the_same_index(corpus, reference, tmp_path):
    """One process (the split is the test above's): killed while it pauses after its first piece."""
    forget(corpus)
    proc = subprocess.Popen(prepare_cmd(corpus, tmp_path, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env={**TORCHRUN_ENV, "HIGGS_DDP_PIECE_LINES": str(LINES),
                                           "HIGGS_DDP_TEST_PIECE_PAUSE_S": "60"})
    index = corpus / ".higgs_codes" / "index"
    try:
        wait_for(lambda: list(index.glob("*.pieces/piece-*.npz")), "a piece", timeout=180)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = list(index.glob("*.pieces/piece-*.npz"))
    assert len(finished) == 1 and not list(index.glob("*/header.json"))
    out = run(prepare_cmd(corpus, tmp_path, 1))
    assert "6 piece(s)" in out and "5 built, 1 kept from an interrupted prepare" in out, out
    assert index_files(the_index(corpus)) == reference
