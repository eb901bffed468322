"""Pre- and post-processing on a large scan, stock nnU-Net vs tucker-export, each stage in its own process.

    python bench/bench_prepost.py                     # 0.8 mm in-plane, 56 slices of the real CT, 118 classes
    python bench/bench_prepost.py --slices 112 --classes 118

The input is made from the real CT (`example_ct.nii.gz`, 3 mm): ``--slices`` central slices,
resampled in-plane to ``--in-plane`` mm (about 460x380 voxels per slice at 0.8 mm). The model is
TotalSegmentator-like in what pre/post-processing sees: CT normalization, ``--classes`` classes,
``--spacing`` mm isotropic (the demo model's plans with those fields changed; no network runs:
the "logits" are seeded random float16 maps of the right shape, as the sliding window returns).

Stages, each a fresh process so its peak RSS is its own (the kernel's high-water mark, reset
before the stage; the inputs already in memory are subtracted):
- preprocess: stock ``run_case`` vs ``preprocess_case`` (checks, read, crop, normalize,
  resample; no label-map resampling);
- export: stock ``export_prediction_from_logits`` vs the chunked PyTorch export.

Then the accuracy half: `infer -m DEMO -f 0 --disable-tta` on both real CT files with
``--stock-export`` and without, Dice per class between the two and the geometry of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tucker_export.benchmarks.paths import RESULTS, SHARED

BIN = Path(sys.executable).parent


def _make_input(work: Path, slices: int, in_plane: float) -> Path:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SHARED / "example_ct.nii.gz"))
    depth = image.GetSize()[2]
    start = max(0, (depth - slices) // 2)
    image = image[:, :, start : start + min(slices, depth)]
    spacing = image.GetSpacing()
    size = [int(round(image.GetSize()[i] * spacing[i] / in_plane)) for i in range(2)] + [image.GetSize()[2]]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                              (in_plane, in_plane, spacing[2]), image.GetDirection(), -1024, image.GetPixelID())
    folder = work / "input"
    folder.mkdir()
    path = folder / "large_0000.nii.gz"
    sitk.WriteImage(resampled, str(path))
    return path


def _make_model(work: Path, demo_model_dir: Path, classes: int, spacing: float) -> Path:
    plans = json.loads((demo_model_dir / "plans.json").read_text())
    dataset = json.loads((demo_model_dir / "dataset.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["spacing"] = [spacing] * 3
    dataset["labels"] = {"background": 0, **{f"class_{i}": i for i in range(1, classes)}}
    folder = work / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir()
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def _stage(stage: str, model_dir: Path, scan: Path, out: Path) -> dict:
    """Runs in the child process: one stage, timed, with its own peak RSS."""
    import torch

    from tucker_export.nnunet.cases import Case
    from tucker_export.nnunet.loading import load_model_spec
    from tucker_export.nnunet.reading import preprocess_case
    from tucker_export.validation.timing import _release_freed_memory as release_freed_memory
    from tucker_export.validation.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    spec = load_model_spec(model_dir)
    case = Case("large", files=[scan])
    extra: dict = {}
    if stage.startswith("export"):
        prepared = preprocess_case(case, spec)
        shape = prepared.data.shape[1:]
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn((spec.label_manager.num_segmentation_heads, *shape), generator=generator,
                             dtype=torch.float16)
        extra = {"logits_shape": list(logits.shape), "scan_shape": list(prepared.properties["shape_before_cropping"])}
        del prepared.data
    release_freed_memory()
    baseline = current_rss_bytes() or 0
    reset_peak_rss()
    started = time.perf_counter()
    if stage == "preprocess_stock":
        preprocessor = spec.configuration_manager.preprocessor_class(verbose=False)
        data, _, _ = preprocessor.run_case([str(scan)], None, spec.plans_manager, spec.configuration_manager,
                                           spec.dataset_json)
        extra = {"preprocessed_shape": list(data.shape)}
    elif stage == "preprocess_ours":
        data = preprocess_case(case, spec).data
        extra = {"preprocessed_shape": list(data.shape)}
    elif stage == "export_stock":
        from nnunetv2.inference.export_prediction import export_prediction_from_logits

        export_prediction_from_logits(logits, prepared.properties, spec.configuration_manager, spec.plans_manager,
                                      spec.dataset_json, str(out / "stock"), False)
    elif stage == "export_ours":
        from tucker_export.nnunet.fast_export import export_segmentation

        export_segmentation(logits, prepared.properties, spec, str(out / "ours"))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "peak_above_inputs_gb": round((peak_rss_bytes() - baseline) / 1e9, 2),
            "torch_threads": torch.get_num_threads(), **extra}


def _dice_half(work: Path, demo_model_dir: Path) -> dict:
    import SimpleITK as sitk

    folder = work / "real"
    folder.mkdir()
    for name in ("example_ct_sm", "example_ct"):
        shutil.copy(SHARED / f"{name}.nii.gz", folder / f"{name}_0000.nii.gz")
    outputs = {}
    for label, flags in (("stock", ["--stock-export"]), ("ours", [])):
        outputs[label] = work / f"real-{label}"
        subprocess.run([str(BIN / "tucker-export"), "-q", "infer", "-i", str(folder), "-o", str(outputs[label]),
                        "-m", str(demo_model_dir), "-f", "0", "--disable-tta", *flags], check=True,
                       stdout=subprocess.DEVNULL)
    result = {}
    for name in ("example_ct_sm", "example_ct"):
        stock = sitk.ReadImage(str(outputs["stock"] / f"{name}.nii.gz"))
        ours = sitk.ReadImage(str(outputs["ours"] / f"{name}.nii.gz"))
        same_geometry = (stock.GetSize() == ours.GetSize() and np.allclose(stock.GetSpacing(), ours.GetSpacing())
                         and np.allclose(stock.GetOrigin(), ours.GetOrigin())
                         and np.allclose(stock.GetDirection(), ours.GetDirection()))
        a, b = sitk.GetArrayFromImage(stock), sitk.GetArrayFromImage(ours)
        dice = {}
        for value in np.union1d(np.unique(a), np.unique(b)):
            if value:
                x, y = a == value, b == value
                dice[str(int(value))] = round(float(2 * (x & y).sum() / (x.sum() + y.sum())), 5)
        result[name] = {"same_geometry": bool(same_geometry), "voxels_equal": round(float((a == b).mean()), 6),
                        "dice_per_class": dice, "dice_min": min(dice.values())}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=56)
    parser.add_argument("--in-plane", type=float, default=0.8)
    parser.add_argument("--classes", type=int, default=118)
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--skip-dice", action="store_true", help="only the large-scan timing half")
    parser.add_argument("--out", type=Path, default=RESULTS / "prepost.json")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(_stage(args.stage, args.work / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                args.work / "input" / "large_0000.nii.gz", args.work)))
        return 0
    if not (SHARED / "example_ct.nii.gz").is_file():
        raise SystemExit(f"the real CT is not at {SHARED}; this benchmark needs it")

    from tucker_export.demo import ensure_demo_model
    from tucker_export.validation.machine import MachineWatch, environment, write_benchmark_json

    watch = MachineWatch()
    demo = ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="bench-prepost-"))
    scan = _make_input(work, args.slices, args.in_plane)
    _make_model(work, demo.model_dir, args.classes, args.spacing)
    stages = {}
    for stage in ("preprocess_stock", "preprocess_ours", "export_stock", "export_ours"):
        done = subprocess.run([sys.executable, "-m", "tucker_export.benchmarks.prepost", "--stage", stage, "--work", str(work)], check=True,
                              capture_output=True, text=True, env=dict(os.environ))
        stages[stage] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{stage}: {stages[stage]['seconds']:.1f} s, peak {stages[stage]['peak_above_inputs_gb']:.2f} GB "
              f"above its inputs", flush=True)
    ratios = {
        kind: {"speedup": round(stages[f"{kind}_stock"]["seconds"] / stages[f"{kind}_ours"]["seconds"], 2),
               "peak_memory_ratio": round(stages[f"{kind}_ours"]["peak_above_inputs_gb"]
                                          / max(stages[f"{kind}_stock"]["peak_above_inputs_gb"], 1e-9), 3)}
        for kind in ("preprocess", "export")
    }
    import SimpleITK as sitk

    image = sitk.ReadImage(str(scan))
    results = {
        "input": {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "classes": args.classes,
                  "model_spacing": args.spacing},
        "stages": stages, "ratios": ratios, "environment": environment(),
    }
    for kind, ratio in ratios.items():
        print(f"{kind}: {ratio['speedup']:.2f}x faster, {ratio['peak_memory_ratio']:.3f}x the peak memory", flush=True)
    if not args.skip_dice:
        results["real_ct_fast_vs_stock_export"] = _dice_half(work, demo.model_dir)
        for name, entry in results["real_ct_fast_vs_stock_export"].items():
            print(f"{name}: min Dice fast vs stock export {entry['dice_min']:.5f}, same geometry "
                  f"{entry['same_geometry']}", flush=True)
    print(write_benchmark_json(args.out, results, watch))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
