"""The embedder server merges photos with different box counts into one forward pass."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meshserve.inference.artifacts import ModelCard, write_card
from meshserve.inference.embedder import Embedder, EmbedderConfig, EmbedNet
from meshserve.servers.batching import Batcher, BatchingConfig, BatchObserver
from meshserve.servers.embedder import EmbedderModel


class Merges(BatchObserver):
    def __init__(self) -> None:
        self.requests_per_call: list[int] = []

    def batch_ran(self, size: int, requests: int, seconds: float) -> None:
        self.requests_per_call.append(requests)


def _untrained_embedder(directory: Path) -> EmbedderModel:
    torch.manual_seed(0)
    config = EmbedderConfig(dim=16, width=8)
    Embedder(EmbedNet(config.dim, config.width), config).save(directory)
    write_card(directory, ModelCard(kind="embedder", version="v1", data_seed=0))
    model = EmbedderModel(str(directory))
    model.load()
    return model


def _photo(seed: int, boxes: int) -> dict:
    rng = np.random.default_rng(seed)
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(encoded, format="JPEG")
    image = encoded.getvalue()
    corners = rng.uniform(0, 40, (1, boxes, 2)).astype(np.float32)
    return {"image": [image], "boxes": np.concatenate([corners, corners + 40], axis=2)}


async def _embed_concurrently(model: EmbedderModel, requests: list[dict]) -> tuple[list[np.ndarray], Merges]:
    merges = Merges()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8), merges)
    batcher.start()
    try:
        calls = []
        for request in requests:
            model.check(request, {})  # what the servicer does before queueing on a busy model
            calls.append(batcher.submit(request, {}, None))
        outputs = await asyncio.gather(*calls)
    finally:
        await batcher.close()
    return [out["embeddings"] for out in outputs], merges


def test_photos_with_different_box_counts_share_a_model_call_and_get_their_own_vectors(tmp_path: Path) -> None:
    model = _untrained_embedder(tmp_path / "embedder")
    box_counts = [1, 3, 2, 1]
    alone = []
    for i, count in enumerate(box_counts):
        request = _photo(i, count)
        model.check(request, {})
        alone.append(model.predict(request, {})["embeddings"])

    merged, merges = asyncio.run(_embed_concurrently(model, [_photo(i, n) for i, n in enumerate(box_counts)]))

    assert max(merges.requests_per_call) > 1, merges.requests_per_call  # the 1-, 3- and 2-box photos merged
    assert sum(merges.requests_per_call) == len(box_counts)
    for count, one, together in zip(box_counts, alone, merged, strict=True):
        assert together.shape == (1, count, 16)
        np.testing.assert_allclose(together, one, atol=1e-5)
