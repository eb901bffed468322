"""On the shipped real-CT model, rank factor 0.3 keeps the segmentations (mean Dice vs undecomposed).

Random-weight factories say nothing about accuracy (random kernels are full rank); the shipped model
is trained on real anatomy, so its kernels have the structure Tucker ranks exploit. Both networks
segment the held-out patients (cropped to one tile each, to keep the suite fast) through nnU-Net's
own predictor (sliding window, Gaussian weighting, resampling back), the decomposed one rebuilt from
the bundle alone. Fixed model, fixed cases: the figure is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tucker_export.exporter.rebuild import build_network

pytestmark = pytest.mark.slow

MIN_MEAN_DICE = 0.95


@pytest.fixture(scope="module")
def demo(request):
    try:
        return request.getfixturevalue("demo_crops")
    except pytest.FixtureLookupError:
        pytest.skip("the demo_crops fixture (tests/conftest.py) is not available")


def _segment(network, parameters, spec, images):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(network, spec.plans_manager, spec.configuration_manager, parameters,
                                    spec.dataset_json, spec.trainer_name, spec.allowed_mirroring_axes)
    return predictor.predict_from_files_sequential([[str(p)] for p in images], None, save_probabilities=False)


def _mean_dice(first: list[np.ndarray], second: list[np.ndarray], labels: list[int]) -> float:
    from tucker_export.validation.metrics import dice_score

    scores = []
    for a, b in zip(first, second):
        for label in labels:
            score = dice_score(a == label, b == label)
            if not math.isnan(score):
                scores.append(score)
    return float(np.mean(scores))


def test_rank_factor_03_keeps_mean_dice_against_the_undecomposed_model(demo, tmp_path):
    from tucker_export.exporter.decompose import decompose_model
    from tucker_export.exporter.ranks import RankPolicy
    from tucker_export.nnunet.loading import load_trained_model

    bundle = decompose_model(demo.model_dir, tmp_path / "bundle", policy=RankPolicy(factor=0.3), progress=False)
    folds = bundle.folds
    decomposed = [build_network(bundle, fold) for fold in folds]
    reference_structure = [(e["name"], e["ranks"]) for e in bundle.fold_entry(folds[0])["layers"]]
    assert all([(e["name"], e["ranks"]) for e in bundle.fold_entry(f)["layers"]] == reference_structure for f in folds)
    totals = bundle.fold_entry(folds[0])["totals"]
    assert totals["factorized"] > 0 and totals["macs_ratio"] < 0.7

    original = load_trained_model(demo.model_dir, list(folds))
    cases = sorted(p.name.removesuffix(".nii.gz") for p in demo.test_labels_dir.glob("*.nii.gz"))
    images = [demo.test_images_dir / f"{case}_0000.nii.gz" for case in cases]
    assert images and all(p.is_file() for p in images)

    spec = original.spec
    undecomposed = _segment(original.networks[folds[0]], [original.state_dicts[f] for f in folds], spec, images)
    compressed = _segment(decomposed[0], [net.state_dict() for net in decomposed], bundle.spec, images)
    labels = [label for label in spec.label_names if label != 0]
    dice = _mean_dice(compressed, undecomposed, labels)
    print(f"demo: rank factor 0.3, MACs x{totals['macs_ratio']:.3f}, mean Dice vs undecomposed {dice:.4f}")
    assert dice >= MIN_MEAN_DICE
