"""`meshserve serve classifier|shipping|embedder` as real processes over tiny, freshly trained
artifacts: Predict equals in-process inference, bad input is INVALID_ARGUMENT, the server lives on."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import consul
import grpc
import numpy as np
import pytest
from PIL import Image

from meshserve.v1 import prediction_pb2, prediction_pb2_grpc
from meshserve.wire import tensors
from tests.conftest import DevAgent
from tests.support import ManagedProcess, free_port, meshserve_argv, wait_serving, wait_until


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MESHSERVE_HOME with a small catalogue and tiny artifacts, trained in seconds."""
    import torch

    from meshserve.training.train import TrainPlan, run

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("home")
    plan = TrainPlan(n_items=60, seed=7, home=path, progress=False, tiny=True)
    results, _ = run(plan)
    assert [r.status for r in results] == ["trained"] * 4, results
    return path


def start(spawn: Callable[..., ManagedProcess], home: Path, kind: str, *extra: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = spawn(meshserve_argv("serve", kind, "--port", str(port), *extra), name=kind,
                 env={"MESHSERVE_HOME": str(home)})
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    return proc, target


def predict(target: str, params: dict[str, float] | None = None, **inputs: object) -> prediction_pb2.PredictResponse:
    request = prediction_pb2.PredictRequest()
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tensors.tensor_from(value))  # type: ignore[arg-type]
    for name, number in (params or {}).items():
        request.parameters[name].double_value = number
    with grpc.insecure_channel(target) as channel:
        return prediction_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=20)


def refused(target: str, **inputs: object) -> str:
    with pytest.raises(grpc.RpcError) as err:
        predict(target, **inputs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return str(err.value.details())


def out(reply: prediction_pb2.PredictResponse, name: str) -> object:
    return tensors.array_from(reply.outputs[name])


# ------------------------------------------------------------------------------ classifier


def listings(home: Path, n: int) -> dict[str, object]:
    from meshserve.training.catalogue import load_items

    items = load_items(home)[:n]
    return {
        "title": [i.title.encode() for i in items],
        "description": [i.description.encode() for i in items],
        "price": np.array([i.price for i in items], np.float32),
        "category": [i.category.encode() for i in items],
    }


def test_classifier_served_equals_in_process(spawn, home: Path) -> None:
    from meshserve.inference.classifiers import ViolationClassifier, resolve_classifier_dir

    _, target = start(spawn, home, "classifier", "--model", "counterfeit", "--no-register")
    batch = listings(home, 12)
    reply = predict(target, **batch)
    assert reply.model_name == "counterfeit"
    local = ViolationClassifier(resolve_classifier_dir("counterfeit", home))
    want = local.score(batch["title"], batch["description"], batch["price"], batch["category"])  # type: ignore[arg-type]
    score = out(reply, "score")
    np.testing.assert_allclose(score, want, atol=1e-6)
    np.testing.assert_array_equal(out(reply, "flagged"), want >= local.threshold)
    # The threshold parameter moves the flag, not the score.
    everything = predict(target, params={"threshold": 0.0}, **batch)
    assert bool(np.all(out(everything, "flagged")))

    # Bad input: the right status, a message naming the field, and the server keeps serving.
    good = listings(home, 2)
    assert "price" in refused(target, **{**good, "price": np.array([10, np.nan], np.float32)})
    assert "price" in refused(target, **{**good, "price": np.array([10, -1], np.float32)})
    assert "UTF-8" in refused(target, **{**good, "title": [b"ok", b"\xff\xfe bad"]})
    assert out(predict(target, **good), "score").shape == (2,)  # type: ignore[union-attr]


def test_classifier_needs_a_name_when_several(home: Path) -> None:
    from meshserve.errors import InvalidInput
    from meshserve.inference.classifiers import resolve_classifier_dir

    with pytest.raises(InvalidInput, match="pick one"):
        resolve_classifier_dir(None, home)
    assert resolve_classifier_dir("contact_info", home).name == "contact_info"


# ------------------------------------------------------------------------------ shipping


def test_shipping_served_equals_in_process_and_registers(spawn, home: Path, dev_agent: DevAgent) -> None:
    from meshserve.inference.artifacts import latest, read_card
    from meshserve.inference.shipping import ShippingEstimator
    from meshserve.training.catalogue import load_items

    _, target = start(spawn, home, "shipping", "--consul", dev_agent.http_addr, "--check-interval", "0.5")
    items = load_items(home)[:15]
    dims = np.array([[i.width_cm, i.height_cm, i.depth_cm] for i in items], np.float32)
    weight = np.array([i.weight_kg for i in items], np.float32)
    cats = [i.category.encode() for i in items]
    titles = [i.title.encode() for i in items]
    reply = predict(target, dims=dims, weight_kg=weight, category=cats, title=titles)
    local = ShippingEstimator.load(latest("shipping", home))  # type: ignore[arg-type]
    np.testing.assert_allclose(out(reply, "probs"), local.predict_proba(dims, weight, cats, titles), atol=1e-6)
    assert [s.decode() for s in out(reply, "size")] == local.predict(dims, weight, cats, titles)  # type: ignore[union-attr]

    assert "weight_kg" in refused(target, dims=dims[:1], weight_kg=np.array([0], np.float32), category=cats[:1])
    assert "dims" in refused(target, dims=np.array([[1, np.inf, 2]], np.float32),
                             weight_kg=weight[:1], category=cats[:1])

    client = consul.Consul(host="127.0.0.1", port=dev_agent.port)
    [entry] = wait_until(lambda: client.health.service("meshserve-shipping", passing=True)[1],
                         timeout=15, what="shipping passing in the registry")
    meta = entry["Service"]["Meta"]
    card = read_card(latest("shipping", home))  # type: ignore[arg-type]
    assert (meta["role"], meta["version"], meta["model"]) == ("shipping", card.version, "shipping-size")


# ------------------------------------------------------------------------------ embedder


def photo(home: Path, item_index: int, seed: int) -> tuple[bytes, np.ndarray]:
    from meshserve.training.catalogue import load_items
    from meshserve.training.render import render_photo

    rendered = render_photo(load_items(home)[item_index], seed)
    return rendered.jpeg, rendered.boxes.astype(np.float32)


def bad_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    return {"empty": b"", "not a supported image": b"<html>nope</html>",
            "truncated": jpeg[: len(jpeg) // 2], "pixels": bomb}


def module_server(home: Path, tmp_path_factory: pytest.TempPathFactory, kind: str):  # type: ignore[no-untyped-def]
    """One server process shared by a module's tests (starting torch is the slow part)."""
    logs = tmp_path_factory.mktemp(f"{kind}-logs")
    port = free_port()
    proc = ManagedProcess(
        meshserve_argv("serve", kind, "--port", str(port), "--no-register", "--max-queue-delay-ms", "20"),
        logs / f"{kind}.log", env={"MESHSERVE_HOME": str(home)},
    )
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, proc)
        yield proc, target
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def embedder_server(home: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    yield from module_server(home, tmp_path_factory, "embedder")


@pytest.fixture(scope="module")
def detector_server(home: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    yield from module_server(home, tmp_path_factory, "detector")


def test_embedder_served_equals_in_process(home: Path, embedder_server) -> None:  # type: ignore[no-untyped-def]
    from meshserve.inference.artifacts import latest
    from meshserve.inference.embedder import Embedder
    from meshserve.servers.embedder import embed_in_process

    _, target = embedder_server
    local = Embedder.load(latest("embedder", home))  # type: ignore[arg-type]
    for index, seed in ((0, 11), (5, 12)):
        image, boxes = photo(home, index, seed)
        boxes = np.concatenate([boxes, [[-20, -20, 40, 50]]]).astype(np.float32)  # one clipped
        reply = predict(target, image=[image], boxes=boxes[None])
        vectors = np.asarray(out(reply, "embeddings"))
        assert vectors.shape == (1, len(boxes), local.dim)
        np.testing.assert_allclose(vectors[0], embed_in_process(local, image, boxes), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(vectors[0], axis=1), 1.0, atol=1e-5)


def test_embedder_refuses_bad_images_and_boxes_and_keeps_serving(home: Path, embedder_server) -> None:  # type: ignore[no-untyped-def]
    proc, target = embedder_server
    box = np.array([[[2, 2, 30, 30]]], np.float32)
    for problem, data in bad_images().items():
        assert problem in refused(target, image=[data], boxes=box), problem
    image, _ = photo(home, 1, 3)
    assert "outside" in refused(target, image=[image], boxes=np.array([[[500, 500, 600, 600]]], np.float32))
    assert "degenerate" in refused(target, image=[image], boxes=np.array([[[10, 10, 10, 50]]], np.float32))
    assert proc.alive()
    assert np.asarray(out(predict(target, image=[image], boxes=box), "embeddings")).shape[:2] == (1, 1)


def test_bad_image_in_a_busy_server_fails_only_its_own_request(home: Path, embedder_server) -> None:  # type: ignore[no-untyped-def]
    """Concurrent good and bad requests: the server merges requests into batches, and a bad
    image must never take its batch-mates down with it."""
    from concurrent.futures import ThreadPoolExecutor

    _, target = embedder_server
    image, boxes = photo(home, 2, 4)
    bad = bad_images()["truncated"]

    def call(i: int) -> str:
        data = bad if i % 3 == 0 else image
        try:
            predict(target, image=[data], boxes=boxes[None])
            return "ok"
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(24)))
    assert codes == ["INVALID_ARGUMENT" if i % 3 == 0 else "ok" for i in range(24)], codes


# ------------------------------------------------------------------------------ detector


def odd_but_valid_images() -> dict[str, bytes]:
    """Images that must give a sane answer: 1×1, grayscale, RGBA, CMYK, EXIF-rotated, 16-bit."""
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))

    def enc(img: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    exif = base.getexif()
    exif[0x0112] = 8
    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    return {
        "1x1": enc(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "grayscale": enc(base.convert("L"), "JPEG"),
        "rgba": enc(base.convert("RGBA"), "PNG"),
        "cmyk": enc(base.convert("CMYK"), "JPEG"),
        "exif": enc(base, "JPEG", exif=exif.tobytes()),
        "16-bit": enc(Image.fromarray(wide), "PNG"),
    }


def test_detector_served_equals_in_process(home: Path, detector_server) -> None:  # type: ignore[no-untyped-def]
    from meshserve.inference.artifacts import latest
    from meshserve.inference.detector import Detector
    from meshserve.inference.vocabulary import CATEGORY_NAMES
    from meshserve.servers.detector import detect_in_process

    _, target = detector_server
    local = Detector.load(latest("detector", home))  # type: ignore[arg-type]
    images = [photo(home, i, 30 + i)[0] for i in range(3)]
    reply = predict(target, params={"min_score": 0.0}, image=images)
    boxes, scores, labels = (np.asarray(out(reply, n)) for n in ("boxes", "scores", "labels"))
    assert [n.decode() for n in out(reply, "label_names")] == list(CATEGORY_NAMES)  # type: ignore[union-attr]
    # up to max_detections boxes, each under up to labels_per_box categories
    assert boxes.shape == (3, local.cfg.max_detections * local.cfg.labels_per_box, 4)
    assert (scores > 0).sum() > 0, "min_score 0 keeps every peak, so some rows are real"
    for i, image in enumerate(images):
        want_b, want_l, want_s = detect_in_process(local, image, 0.0)
        np.testing.assert_allclose(scores[i], want_s, atol=1e-5)
        np.testing.assert_allclose(boxes[i], want_b, atol=1e-4)  # pixels, from 1e-5-close logits
        np.testing.assert_array_equal(labels[i], want_l)


def test_detector_bad_and_odd_images(home: Path, detector_server) -> None:  # type: ignore[no-untyped-def]
    proc, target = detector_server
    for problem, data in bad_images().items():
        assert problem in refused(target, image=[data]), problem
    for name, data in odd_but_valid_images().items():
        reply = predict(target, image=[data])
        boxes, scores = np.asarray(out(reply, "boxes")), np.asarray(out(reply, "scores"))
        assert np.isfinite(boxes).all() and np.isfinite(scores).all(), name
        assert ((scores >= 0) & (scores <= 1)).all(), name
    assert proc.alive()
