"""Shared fixtures: small trained checkpoints, cached for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests run as `pytest -n 2` on 2 shared cores: one intra-op thread per worker avoids the
# oversubscription that makes tiny torch models 10x slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: train a tiny model into a session temp dir and return the checkpoint dir.

    `make_checkpoint(bn="pre", input_norm=True, dataset="iris", activation="relu", epochs=3,
    hidden=(16, 8), **more_train_settings)`. Calls with the same arguments share one
    checkpoint (treat it as read-only; copy it before changing files). Any `TrainSettings`
    field may be passed, e.g. `task="regression", dataset="synthetic", samples=200`.
    """
    cache: dict[tuple, Path] = {}

    def make(
        bn: str = "pre",
        input_norm: bool = True,
        dataset: str = "iris",
        activation: str = "relu",
        epochs: int = 3,
        hidden: tuple[int, ...] = (16, 8),
        **settings: object,
    ) -> Path:
        from bn_onnx.train import TrainSettings, train

        key = (
            bn,
            input_norm,
            dataset,
            activation,
            epochs,
            tuple(hidden),
            tuple(sorted(settings.items())),
        )
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt") / "checkpoint"
            run = TrainSettings(
                dataset=dataset,
                bn=bn,
                input_norm=input_norm,
                activation=activation,
                epochs=epochs,
                hidden=tuple(hidden),
                patience=0,
                **settings,  # type: ignore[arg-type]
            )
            train(run, out)
            cache[key] = out
        return cache[key]

    return make
