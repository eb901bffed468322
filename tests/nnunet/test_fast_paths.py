"""The faster pre- and post-processing against stock nnU-Net's: same data, same labels, same geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import make_model_folder, write_ct

from tucker_export.nnunet.cases import Case
from tucker_export.nnunet.fast_export import fast_export_unsupported, segmentation_from_logits
from tucker_export.nnunet.loading import load_model_spec
from tucker_export.nnunet.reading import preprocess_case


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return load_model_spec(make_model_folder(tmp_path_factory.mktemp("model"), num_labels=6))


def _stock_preprocess(spec, path: Path):
    preprocessor = spec.configuration_manager.preprocessor_class(verbose=False)
    return preprocessor.run_case([str(path)], None, spec.plans_manager, spec.configuration_manager, spec.dataset_json)


@pytest.mark.parametrize("spacing", [(1.2, 1.0, 1.5), (0.7, 0.7, 3.2)])  # isotropic-ish; anisotropic (separate z)
def test_preprocessing_is_stocks_without_the_label_resampling(spec, tmp_path: Path, spacing) -> None:
    path = tmp_path / "scan.nii.gz"
    write_ct(path, shape=(14, 40, 36), spacing=spacing)
    ours = preprocess_case(Case("scan", files=[path]), spec)
    data, _, properties = _stock_preprocess(spec, path)
    assert np.array_equal(ours.data, data)
    assert ours.properties.keys() == properties.keys()
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(ours.properties[key]), np.asarray(properties[key]))


def _smooth_logits(shape, classes: int, seed: int = 0) -> torch.Tensor:
    """Blobs, not noise: real logits vary smoothly, and noise would make every voxel a near-tie."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"))
    centres = rng.random((classes, 3))
    distance = np.linalg.norm(grid[None] - centres[:, :, None, None, None], axis=1)
    return torch.from_numpy((-8 * distance + rng.normal(0, 0.05, distance.shape)).astype(np.float16))


@pytest.mark.parametrize("spacing", [(1.2, 1.0, 1.5), (0.7, 0.7, 3.2)])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 1])  # all classes at once; one class per chunk
def test_fast_export_labels_match_stocks(spec, tmp_path: Path, spacing, chunk_bytes: int) -> None:
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    path = tmp_path / "scan.nii.gz"
    write_ct(path, shape=(14, 40, 36), spacing=spacing)
    data, _, properties = _stock_preprocess(spec, path)
    logits = _smooth_logits(data.shape[1:], classes=7)
    stock = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, spec.plans_manager, spec.configuration_manager, spec.label_manager, properties)
    ours = segmentation_from_logits(logits, properties, spec, chunk_bytes=chunk_bytes)
    assert ours.shape == stock.shape and ours.dtype == stock.dtype
    assert (ours == stock).mean() >= 0.999
    for label in range(1, 7):
        a, b = ours == label, stock == label
        if a.sum() + b.sum() > 50:
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.995


def test_fast_export_written_with_the_scans_geometry(spec, tmp_path: Path) -> None:
    from tucker_export.nnunet.fast_export import export_segmentation

    path = tmp_path / "scan.nii.gz"
    source = write_ct(path, shape=(14, 40, 36))
    prepared = preprocess_case(Case("scan", files=[path]), spec)
    export_segmentation(_smooth_logits(prepared.data.shape[1:], 7), prepared.properties, spec, str(tmp_path / "seg"))
    written = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing())
    assert np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetDirection(), source.GetDirection())


def test_where_the_fast_export_does_not_apply(spec) -> None:
    assert fast_export_unsupported(spec, save_probabilities=False) is None
    assert "probabilities are saved" in fast_export_unsupported(spec, save_probabilities=True)
    configuration = spec.configuration_manager.configuration
    original = dict(configuration["resampling_fn_probabilities_kwargs"])
    try:
        configuration["resampling_fn_probabilities_kwargs"]["order"] = 3
        assert "order 3" in fast_export_unsupported(spec, save_probabilities=False)
    finally:
        configuration["resampling_fn_probabilities_kwargs"] = original
