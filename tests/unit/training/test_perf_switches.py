"""Activation checkpointing, the supervised-only text head and torch.compile leave loss and gradients unchanged.

The speed and memory switches change nothing but speed and memory: activation checkpointing, the
text head applied only to supervised rows (chunked or not) and torch.compile give the same loss and
the same gradients as the plain model, through the real Trainer on the tiny HiggsAudioModel."""

import pytest
import torch
from helpers import PLAIN, assert_same, first_step

from higgs_ddp.dual_loss import compute_dual_loss, head_cross_entropy_sum


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_activation_checkpointing_same_loss_and_gradients_and_recomputes(tmp_path, mode):
    plain = first_step(tmp_path, "plain", *PLAIN, mode=mode)
    ckpt = first_step(tmp_path, "ckpt", "train.text_logits=all", "train.activation_checkpointing=true", mode=mode)
    assert_same(plain[:2], ckpt[:2], exact=True)
    # It really is on: each decoder layer's MLP runs again during backward.
    runs = {"plain": 0, "ckpt": 0}
    for name, res in (("plain", plain), ("ckpt", ckpt)):
        trainer = res[3]
        mlp = trainer.raw.layers[0].mlp
        h = mlp.register_forward_hook(lambda *a, n=name: runs.__setitem__(n, runs[n] + 1))
        batch = next(iter(trainer.loader))
        trainer.loss(trainer.wrapped(**batch.model_inputs()), batch, check=True).loss.backward()
        h.remove()
    assert runs == {"plain": 1, "ckpt": 2}


@pytest.mark.parametrize("mode", ["lora", "full"])  # full: the text head itself gets gradients
def test_supervised_text_logits_same_loss_and_gradients_without_full_logits(tmp_path, mode):
    full = first_step(tmp_path, "all", *PLAIN, mode=mode)
    sup = first_step(tmp_path, "sup", "train.text_logits=supervised", "train.text_logits_chunk=0", mode=mode)
    chunked = first_step(tmp_path, "chunk", "train.text_logits=supervised", "train.text_logits_chunk=3", mode=mode)
    assert_same(full[:2], sup[:2], exact=False)
    assert_same(sup[:2], chunked[:2], exact=False)
    (b, t, vocab), = full[2]  # the model's own head: logits for every position
    rows, hidden = int(full[0].text_tokens), 64
    assert sup[2] == [(b, t, hidden), (rows, vocab)]  # passed through, then applied to supervised rows
    logits = chunked[2][1:]
    assert len(logits) >= 2 and logits[:-1] == [(3, vocab)] * (len(logits) - 1)
    assert sum(n for n, _ in logits) == 2 * rows  # each chunk again in backward: its logits weren't kept
    assert rows < b * t / 4, "the tiny batch should have few supervised text positions"


def test_both_switches_together_match_the_plain_model(tmp_path):
    plain = first_step(tmp_path, "plain", *PLAIN)
    both = first_step(tmp_path, "both", "train.text_logits=supervised", "train.text_logits_chunk=2",
                      "train.activation_checkpointing=true")
    assert_same(plain[:2], both[:2], exact=False)


def test_chunked_head_cross_entropy_keeps_one_chunk_of_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(64, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    ref.backward()
    g_ref = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        got = head_cross_entropy_sum(head, hidden, targets, chunk_rows=8)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, g_ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, g_ref[1], rtol=1e-5, atol=1e-6)
    # Nothing the size of a chunk's logits (8 x 1000) is kept for backward, let alone all 64 rows'.
    assert max(saved) < 8 * 1000


def test_loss_takes_logits_or_hidden_and_head_not_both():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, 1, 2, 3]])
    with pytest.raises(ValueError, match="either logits"):
        compute_dual_loss(logits, labels, None, None, alignment="shifted", text_head=torch.nn.Linear(4, 10),
                          text_hidden=torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="either logits"):
        compute_dual_loss(None, labels, None, None, alignment="shifted")


@pytest.mark.slow
@pytest.mark.extended
def test_compiled_layers_same_loss_and_gradients(tmp_path):
    # Without dropout: compiled code draws dropout masks from inductor's own generator, not eager's,
    # so with dropout the two runs are equally valid but not equal.
    plain = first_step(tmp_path, "plain", *PLAIN, "lora.dropout=0.0")
    compiled = first_step(tmp_path, "compiled", *PLAIN, "train.compile=true", "lora.dropout=0.0")
    # Inductor fuses and reorders float operations: equal to float tolerance, not bit for bit.
    dl_a, g_a = plain[:2]
    dl_b, g_b = compiled[:2]
    torch.testing.assert_close(dl_b.loss, dl_a.loss, rtol=1e-5, atol=1e-6)
    for k in g_a:
        torch.testing.assert_close(g_b[k], g_a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_prefetcher_keeps_order_raises_the_loaders_error_and_closes_promptly():
    import itertools
    import time

    from higgs_ddp.data.prefetch import Prefetcher

    def failing():
        yield from range(5)
        raise ValueError("sample 7: bad codes")

    p = Prefetcher(failing(), torch.device("cpu"))
    assert [next(p) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="sample 7"):
        next(p)
    p.close()

    endless = Prefetcher(itertools.count(), torch.device("cpu"))  # the samplers never end
    assert next(endless) == 0 and next(endless) == 1
    t0 = time.perf_counter()
    endless.close()  # its thread is blocked on a full queue: it must notice and stop
    assert time.perf_counter() - t0 < 2 and not endless._thread.is_alive()


def test_closing_the_prefetcher_shuts_the_loader_workers_down():
    """Distributed runs end without interpreter finalization (distributed.exit_process), so the DataLoader's
    worker processes must be gone once the batches are closed, not left for an exit handler."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from higgs_ddp.data.prefetch import Prefetcher

    before = set(multiprocessing.active_children())
    p = Prefetcher(iter(DataLoader(range(64), batch_size=2, num_workers=2)), torch.device("cpu"))
    assert next(p).tolist() == [0, 1]
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    p.close()
    assert not any(w.is_alive() for w in workers)
