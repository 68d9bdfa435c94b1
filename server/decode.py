"""Request images are decoded off the event loop, in a bounded pool, within a per-request budget.

A legal 4096² 16-bit PNG takes about 0.4 s to decode; on the event loop that would stall every
other rpc (health checks included) for as long. Here:

- ``decode_threads`` threads decode; at most ``max_decode_backlog`` decodes are in the pool at once
  (running or waiting), and one more is refused at once with RESOURCE_EXHAUSTED (field ``image``).
- Pixel budget: an image over ``max_image_pixels`` is refused from its header, before any pixel
  is decoded (INVALID_ARGUMENT), so one decode's time and memory are bounded.
- Time budget: a request waits at most ``decode_timeout_s`` for its image (waiting in the pool plus
  decoding), then fails with RESOURCE_EXHAUSTED. A running PIL decode cannot be interrupted: a decode
  that has not started is dropped, one that has started runs to its end in the background and keeps
  its thread and its backlog slot until then, so the backlog bounds the work actually running.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from handlers.model import InputSpec
from handlers.preprocess import input_from_image
from server.settings import Settings


class DecodeBudgetError(Exception):
    """The decode pool is full, or an image was not decoded within its time budget; ``field`` and
    ``detail`` as in :class:`handlers.errors.InvalidInputError`."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class ImageDecoder:
    """Decodes request images in its own threads; owned by the registry, closed with it."""

    def __init__(self, settings: Settings):
        self.max_pixels = settings.max_image_pixels
        self.timeout_s = settings.decode_timeout_s
        self.backlog = settings.max_decode_backlog
        self._slots = threading.BoundedSemaphore(settings.max_decode_backlog)
        self._executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")

    async def decode(self, data: bytes, spec: InputSpec, field: str = "image") -> torch.Tensor:
        """``data`` (PNG/JPEG bytes) -> float32 (*spec.shape), decoded in the pool."""
        if not self._slots.acquire(blocking=False):
            raise DecodeBudgetError(field, f"the decode pool is full ({self.backlog} images at once); retry later")
        try:
            job = self._executor.submit(input_from_image, data, spec, max_pixels=self.max_pixels, field=field)
        except BaseException:
            self._slots.release()
            raise
        # The slot is freed when the decode ends, or when it is cancelled before it started.
        job.add_done_callback(lambda _: self._slots.release())
        try:
            # Cancelling the wrapper (time budget spent, rpc cancelled) cancels a job not yet started.
            return await asyncio.wait_for(asyncio.wrap_future(job), self.timeout_s)
        except TimeoutError:
            raise DecodeBudgetError(field, f"not decoded within the time budget of {self.timeout_s:g} s "
                                           f"(the image is large or the decoders are busy)") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
