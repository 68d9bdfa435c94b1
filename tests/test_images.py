"""Request images (issue 15, items 8 and 9): decoded off the event loop in a bounded pool within a
per-request budget (docs/limits.md, "Image decoding"), and 16-bit PNGs read on the right scale."""

from __future__ import annotations

import asyncio
import io
import statistics
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from protoserve_client import pb, pb_grpc

from conftest import RunningServer
from handlers.errors import InvalidInputError
from handlers.model import InputSpec
from handlers.preprocess import input_from_image
from server import decode
from server.decode import DecodeBudgetError, ImageDecoder
from server.settings import Settings

MNIST_SPEC = InputSpec(shape=[1, 28, 28], image={"mode": "L", "size": [28, 28], "scale": 1 / 255})
PIXEL_SPEC = InputSpec(shape=[1, 28, 28], image={"mode": "L", "size": [28, 28], "scale": 1.0})  # 8-bit levels
RGB_SPEC = InputSpec(shape=[3, 28, 28], image={"mode": "RGB", "size": [28, 28], "scale": 1 / 255})
TIGHT_PIXELS = 64 * 64
PIXELS = 1 << 20  # for calls of input_from_image itself


def _png(array: np.ndarray) -> bytes:
    """uint8 (H, W) -> an 8-bit grayscale PNG; uint16 (H, W) -> a 16-bit grayscale PNG (PIL mode I;16)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_16_bit_rgb(array: np.ndarray) -> bytes:
    """uint16 (H, W, 3) -> a 16-bit RGB PNG, written by hand (PIL writes none)."""
    height, width, _ = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)  # filter 0 per row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def _png_header(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG that claims ``width`` x ``height`` pixels in a few dozen bytes."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def _big_16_bit_png() -> bytes:
    """A legal 4096 x 4096 16-bit grayscale PNG (a smooth ramp: about 0.2 MB, about 0.4 s to decode)."""
    ramp = (np.add.outer(np.arange(4096), np.arange(4096)) * 7 % 65536).astype(np.uint16)
    return _png(ramp)


@pytest.fixture(scope="module")
def digit(mnist_split) -> np.ndarray:
    """A held-out MNIST digit as 8-bit pixels (28, 28)."""
    return np.rint(mnist_split["x_test"][0, 0].numpy() * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def _refusal(rpc, request) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, protoserve-field trailer) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        rpc(request, timeout=60)
    error = caught.value
    return error.code(), error.details(), dict(error.trailing_metadata() or ()).get("protoserve-field", "")


# ------------------------------------------------------------------------------ 16-bit PNGs


def test_a_16_bit_png_of_a_digit_gives_the_logits_of_its_8_bit_png(stub, digit):
    as_tensor = pb.Tensor(dtype="uint8", shape=[1, 28, 28], data=digit.tobytes())
    expected = stub.Predict(pb.PredictRequest(model="mnist", input=as_tensor, top_k=10), timeout=60).prediction
    wide = digit.astype(np.uint16) * 257  # the same levels in 16 bits: 8-bit v is 16-bit 257·v
    for image in (_png(digit), _png(wide), _png_16_bit_rgb(np.repeat(wide[..., None], 3, axis=-1))):
        got = stub.Predict(pb.PredictRequest(model="mnist", image=image, top_k=10), timeout=60).prediction
        assert [c.class_index for c in got] == [c.class_index for c in expected]
        np.testing.assert_allclose([c.logit for c in got], [c.logit for c in expected], atol=1e-4)
    assert expected[0].logit > 5  # a confident digit, not a washed-out white square
    explained = [stub.Explain(pb.ExplainRequest(model="mnist", image=image, heatmaps=pb.HEATMAP_MODE_NONE),
                              timeout=60) for image in (_png(digit), _png(wide))]
    assert [c.id for c in explained[0].components] == [c.id for c in explained[1].components]
    np.testing.assert_allclose([c.contribution for c in explained[1].components],
                               [c.contribution for c in explained[0].components], atol=1e-4)


def test_a_resized_16_bit_png_matches_its_8_bit_png_within_one_level(digit):
    big = np.kron(digit, np.ones((3, 3), np.uint8))  # 84 x 84: resized to 28 x 28
    eight = input_from_image(_png(big), PIXEL_SPEC, max_pixels=PIXELS)
    sixteen = input_from_image(_png(big.astype(np.uint16) * 257), PIXEL_SPEC, max_pixels=PIXELS)
    # The 8-bit path rounds its resized pixels to whole levels; the 16-bit path resizes in float.
    assert float((eight - sixteen).abs().max()) <= 1.0
    assert float(sixteen.max()) > 250  # on the 8-bit scale, not clipped and not 257 times too bright


def test_16_bit_gray_for_an_rgb_model_is_replicated_and_other_modes_are_refused(digit):
    wide = _png(digit.astype(np.uint16) * 257)
    expected = input_from_image(_png(digit), RGB_SPEC, max_pixels=PIXELS)
    assert expected.shape == (3, 28, 28)
    assert bool((input_from_image(wide, RGB_SPEC, max_pixels=PIXELS) == expected).all())
    cmyk = InputSpec(shape=[4, 28, 28], image={"mode": "CMYK", "size": [28, 28]})
    with pytest.raises(InvalidInputError, match=r"^image: a 16-bit grayscale image cannot be converted to this "
                                                r"model's mode CMYK; send an 8-bit image$") as caught:
        input_from_image(wide, cmyk, max_pixels=PIXELS)
    assert caught.value.field == "image"


# --------------------------------------------------------------------------- decoding off the loop


def test_images_are_decoded_in_the_pool_not_on_the_event_loop(server, stub, digit, monkeypatch):
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return input_from_image(*args, **kwargs)

    monkeypatch.setattr(decode, "input_from_image", recording)
    image = _png(digit)
    stub.Predict(pb.PredictRequest(model="mnist", image=image), timeout=60)
    stub.Explain(pb.ExplainRequest(model="mnist", image=image), timeout=60)
    answers = list(stub.ExplainStream(iter([pb.ExplainRequest(model="mnist", image=image, request_id="s")]),
                                      timeout=60))
    assert answers[0].WhichOneof("result") == "response"
    assert len(threads) == 3
    assert all(t is not server.thread and t.name.startswith("decode") for t in threads), threads


@pytest.fixture(scope="module")
def patient_server(demo_store):
    """Default pool (2 threads, backlog 16), with time enough for every big image on a busy machine."""
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     decode_timeout_s=120.0))
    yield running
    running.stop()


def test_health_checks_stay_answered_while_big_pngs_are_decoded(patient_server):
    big = _big_16_bit_png()
    with grpc.insecure_channel(patient_server.address) as channel:
        explainer, health = pb_grpc.ExplainerStub(channel), health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected
        calls = [explainer.Predict.future(pb.PredictRequest(model="mnist", image=big), timeout=120)
                 for _ in range(8)]  # 8 x ~0.5 s of decoding: seconds of a blocked loop if it ran there
        latencies, started = [], time.monotonic()
        while not all(call.done() for call in calls) and len(latencies) < 2000 and time.monotonic() - started < 120:
            start = time.perf_counter()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.perf_counter() - start)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert all(call.result().prediction for call in calls)
    assert len(latencies) >= 3, latencies
    assert statistics.median(latencies) < 0.25, sorted(latencies)[-5:]


@pytest.fixture(scope="module")
def tight_server(demo_store):
    """One decoding thread, one image in the pool at once, a 1 s time budget, 64 x 64 pixels."""
    running = RunningServer(Settings(model_store=demo_store, port=0, metrics_port=0, shutdown_grace_s=2.0,
                                     decode_threads=1, max_decode_backlog=1, decode_timeout_s=1.0,
                                     max_image_pixels=TIGHT_PIXELS))
    yield running
    running.stop()


@pytest.fixture()
def tight_stub(tight_server):
    with grpc.insecure_channel(tight_server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


class _Gate:
    """Wraps the decode function: each decode waits until the gate opens (at most 60 s)."""

    def __init__(self):
        self.started, self.opened, self.finished, self.calls = (threading.Event(), threading.Event(),
                                                                threading.Event(), 0)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.started.set()
        self.opened.wait(60)
        try:
            return input_from_image(*args, **kwargs)
        finally:
            self.finished.set()


def test_a_full_pool_and_a_spent_time_budget_are_resource_exhausted(tight_stub, digit, monkeypatch):
    gate = _Gate()
    monkeypatch.setattr(decode, "input_from_image", gate)
    request = pb.PredictRequest(model="mnist", image=_png(digit))
    first = tight_stub.Predict.future(request, timeout=60)
    assert gate.started.wait(30)  # the first image holds the only thread and the only backlog slot
    code, details, field = _refusal(tight_stub.Predict, request)
    assert (code, field) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "image")
    assert details == "image: the decode pool is full (1 images at once); retry later"
    with pytest.raises(grpc.RpcError) as caught:
        first.result()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == ("image: not decoded within the time budget of 1 s (the image is large "
                                      "or the decoders are busy)")
    # The abandoned decode still runs (PIL cannot be interrupted), so it still holds its slot.
    assert _refusal(tight_stub.Predict, request)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    gate.opened.set()
    deadline = time.monotonic() + 30
    while True:  # the slot comes back when the decode ends
        try:
            assert tight_stub.Predict(request, timeout=60).prediction
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)


def test_the_pixel_budget_is_a_setting_checked_from_the_header(tight_stub, stub):
    ok = tight_stub.Predict(pb.PredictRequest(model="mnist", image=_png(np.zeros((64, 64), np.uint8))), timeout=60)
    assert ok.prediction
    code, details, field = _refusal(tight_stub.Predict,
                                    pb.PredictRequest(model="mnist", image=_png(np.zeros((64, 65), np.uint8))))
    assert (code, details, field) == (grpc.StatusCode.INVALID_ARGUMENT, "image: 65x64 is larger than 4096 pixels",
                                      "image")
    # Headers that claim huge images, in a few dozen bytes: refused before any pixel is decoded.
    code, details, field = _refusal(stub.Explain, pb.ExplainRequest(model="mnist", image=_png_header(5000, 5000)))
    assert (code, details, field) == (grpc.StatusCode.INVALID_ARGUMENT,
                                      "image: 5000x5000 is larger than 16777216 pixels", "image")
    code, details, field = _refusal(stub.Predict, pb.PredictRequest(model="mnist", image=_png_header(10 ** 5, 10 ** 5)))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "image")
    assert "decompression bomb" in details


def test_a_decode_that_has_not_started_is_dropped_when_its_request_gives_up(digit, monkeypatch, tmp_path):
    gate = _Gate()
    monkeypatch.setattr(decode, "input_from_image", gate)
    decoder = ImageDecoder(Settings(model_store=tmp_path, decode_threads=1, max_decode_backlog=2,
                                    decode_timeout_s=0.5))
    image = _png(digit)

    async def scenario():
        running = asyncio.ensure_future(decoder.decode(image, MNIST_SPEC))
        while not gate.started.is_set():  # bounded: the gate is open within 60 s in any case
            await asyncio.sleep(0.01)
        outcomes = await asyncio.gather(running, decoder.decode(image, MNIST_SPEC), return_exceptions=True)
        gate.opened.set()
        assert await asyncio.to_thread(gate.finished.wait, 60)
        await asyncio.sleep(0.2)  # time for the waiting decode to start, had it not been dropped
        calls = gate.calls
        for _ in range(200):  # both slots come back: two decodes at once succeed
            decoded = await asyncio.gather(decoder.decode(image, MNIST_SPEC), decoder.decode(image, MNIST_SPEC),
                                           return_exceptions=True)
            if not any(isinstance(x, Exception) for x in decoded):
                break
            await asyncio.sleep(0.05)
        return outcomes, calls, decoded

    try:
        timed_out, calls, decoded = asyncio.run(scenario())
    finally:
        decoder.close()
    assert [type(outcome) for outcome in timed_out] == [DecodeBudgetError, DecodeBudgetError]
    assert calls == 1  # the waiting decode never ran
    assert [tuple(x.shape) for x in decoded] == [(1, 28, 28), (1, 28, 28)]
