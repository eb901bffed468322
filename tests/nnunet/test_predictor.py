"""EnginePredictor: nnU-Net's numbers through any per-fold callable, with tile batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import make_model_folder

from tucker_export.errors import ConfigurationError
from tucker_export.nnunet.loading import load_trained_model
from tucker_export.nnunet.predictor import EnginePredictor, mirror_axis_combinations


def test_mirror_combinations_match_nnunet_order() -> None:
    assert mirror_axis_combinations(None, 3) == [()]
    assert mirror_axis_combinations((0, 1, 2), 3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with pytest.raises(ConfigurationError, match="do not fit a 2D patch"):
        mirror_axis_combinations((0, 1, 2), 2)


def _stock_logits(model_dir, folds, data: torch.Tensor) -> torch.Tensor:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=folds)
    return predictor.predict_logits_from_preprocessed_data(data)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_logits_equal_stock_nnunet_for_any_batch(tmp_path, batch_size: int) -> None:
    model_dir = make_model_folder(tmp_path, folds=(0, 1))
    loaded = load_trained_model(model_dir)
    torch.manual_seed(0)
    data = torch.randn(1, 22, 30, 27)  # not a multiple of the 16^3 patch: the last tiles overlap
    calls: list[int] = []

    def engine(network):
        def run(batch):
            calls.append(batch.shape[0])
            with torch.no_grad():
                return network(batch)
        return run

    predictor = EnginePredictor(batch_size=batch_size, allow_tqdm=False)
    predictor.initialize(loaded.spec, {f: engine(n) for f, n in loaded.networks.items()})
    ours = predictor.predict_logits_from_preprocessed_data(data)
    stock = _stock_logits(model_dir, (0, 1), data)
    # the accumulators are fp16 in nnU-Net: batching changes only the last fp32 bits before that
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-2 if batch_size > 1 else 0)
    assert max(calls) <= batch_size
    tiles = 2 * 3 * 3  # sliding-window tiles per fold for this shape
    assert sum(calls) == 2 * tiles * 8  # two folds, every tile, every mirror: nothing dropped
    assert np.array_equal(ours.argmax(0), stock.argmax(0))


def test_no_tta_batches_tiles_only(tmp_path) -> None:
    model_dir = make_model_folder(tmp_path)
    loaded = load_trained_model(model_dir)
    calls: list[int] = []

    def run(batch):
        calls.append(batch.shape[0])
        with torch.no_grad():
            return loaded.networks[0](batch)

    predictor = EnginePredictor(batch_size=5, use_mirroring=False, allow_tqdm=False)
    predictor.initialize(loaded.spec, {0: run})
    predictor.predict_logits_from_preprocessed_data(torch.randn(1, 22, 30, 27))
    assert calls == [5, 5, 5, 3]  # 18 tiles, the short last batch is run, not dropped


def test_bad_options() -> None:
    with pytest.raises(ConfigurationError, match="Step size must be in"):
        EnginePredictor(tile_step_size=0)
    with pytest.raises(ConfigurationError, match="Batch size must be at least 1"):
        EnginePredictor(batch_size=0)


def test_the_private_nnunet_seams_exist_with_the_parameters_relied_on():
    """The contract behind pyproject's upper bound on nnunetv2: run against a new release before admitting it."""
    import inspect

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from tucker_export.nnunet.predictor import PRIVATE_SEAMS

    for name, parameters in PRIVATE_SEAMS.items():
        method = getattr(nnUNetPredictor, name, None)
        assert method is not None, f"nnUNetPredictor.{name} is gone"
        assert list(inspect.signature(method).parameters)[1:] == list(parameters), name
