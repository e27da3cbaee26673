"""Batches fetched and copied to the device on a background thread, ahead of the step that uses them.

Taking a batch from DataLoader workers means unpickling its tensors out of shared memory, and with
``num_workers: 0`` collating it: milliseconds in which the step would otherwise wait. The thread does
that (and on CUDA the pinned host-to-device copy, on a side stream) while the current step computes.
The order of batches is the sampler's, so nothing about the training changes.
"""

from __future__ import annotations

import queue
import threading

import torch


class _Stop:
    pass


class Prefetcher:
    def __init__(self, iterator, device: torch.device, depth: int = 2):
        self.device, self._it = device, iterator
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="higgs-ddp-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0, not this rank's
            stream = torch.cuda.Stream(self.device)
        try:
            for batch in self._it:
                event = None
                if stream is not None:
                    with torch.cuda.stream(stream):
                        batch = batch.to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                if not self._put((batch, event)):
                    return
        except BaseException as e:  # handed to the training thread, which raises it there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._closing.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        batch, event = item
        if event is not None:
            # The copy ran on the side stream: wait for it, and keep its memory from being reused
            # by that stream's allocator while this one still reads it.
            torch.cuda.current_stream(self.device).wait_event(event)
            for f in batch.__dataclass_fields__:
                value = getattr(batch, f)
                if isinstance(value, torch.Tensor):
                    value.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def close(self) -> None:
        """Stop the thread, then let go of the loader's iterator: freeing it shuts its worker processes
        down now, not at interpreter exit (which a distributed run skips: distributed.exit_process)."""
        self._closing.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._it = None
            # An error from the loader (a worker that died) holds the iterator through its traceback.
            while not self._q.empty():
                self._q.get_nowait()
