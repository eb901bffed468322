"""The overlapped case pipeline: order kept, failures isolated, never more than one case ahead."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tucker_export.case_pipeline as pipeline
from tucker_export.errors import BrokenScanError
from tucker_export.nnunet.cases import Case
from tucker_export.nnunet.reading import PreparedCase

SPEC = SimpleNamespace(dataset_json={"file_ending": ".nii.gz"}, configuration_manager=None, plans_manager=None)


@pytest.fixture
def recorder(monkeypatch):
    """Fake preprocess/export that log events, so the test sees the pipeline's order and bounds."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    alive: set[str] = set()
    peak = {"alive": 0}

    def log(kind: str, name: str) -> None:
        with lock:
            events.append((kind, name))
            if kind == "prepared":
                alive.add(name)
            if kind == "exported":
                alive.discard(name)
            peak["alive"] = max(peak["alive"], len(alive))

    def fake_preprocess(case, spec, **options):
        if case.name == "broken":
            raise BrokenScanError("broken.nii.gz: the gzip stream ends after 10 bytes")
        log("prepared", case.name)
        return PreparedCase(np.zeros((1, 2, 2, 2), np.float32), {"name": case.name})

    def fake_export(logits, properties, cm, pm, dj, truncated, save_probabilities):
        if properties["name"] == "unwritable":
            raise OSError("disk full")
        Path(truncated + ".nii.gz").write_bytes(b"seg")
        log("exported", properties["name"])

    import nnunetv2.inference.export_prediction as export_module

    monkeypatch.setattr(pipeline, "preprocess_case", fake_preprocess)
    monkeypatch.setattr(export_module, "export_prediction_from_logits", fake_export)
    return SimpleNamespace(events=events, log=log, peak=peak)


def _predict(recorder):
    def predict(data: torch.Tensor) -> torch.Tensor:
        recorder.log("network", "?")
        return torch.zeros((3, *data.shape[1:]))

    return predict


@pytest.mark.parametrize("overlap", [True, False])
def test_results_in_order_and_failures_isolated(recorder, tmp_path: Path, overlap: bool) -> None:
    names = ["a", "broken", "b", "unwritable", "c"]
    cases = [Case(n, files=[tmp_path / f"{n}.nii.gz"]) for n in names]
    (tmp_path / "out").mkdir()
    results = pipeline.run_cases(cases, spec=SPEC, predict=_predict(recorder), output_dir=tmp_path / "out",
                                 overlap=overlap, fast_export=False)
    assert [r.name for r in results] == names
    assert [r.status for r in results] == ["done", "failed", "done", "failed", "done"]
    assert results[1].error.startswith("broken.nii.gz: the gzip stream ends")
    assert results[3].error == "disk full"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert set(results[0].seconds) == {"check", "read", "preprocess", "network", "export"}


def test_at_most_one_case_ahead_and_one_export_in_flight(recorder, tmp_path: Path) -> None:
    cases = [Case(f"case{i}", files=[]) for i in range(8)]
    (tmp_path / "out").mkdir()
    pipeline.run_cases(cases, spec=SPEC, predict=_predict(recorder), output_dir=tmp_path / "out", overlap=True,
                        fast_export=False)
    assert recorder.peak["alive"] <= 3  # one being prepared, one in the network, one being exported
    prepared = [name for kind, name in recorder.events if kind == "prepared"]
    assert prepared == [c.name for c in cases]
    networks_before = []  # how many network calls had finished when each case was prepared
    count = 0
    for kind, _ in recorder.events:
        count += kind == "network"
        if kind == "prepared":
            networks_before.append(count)
    assert all(done >= index - 1 for index, done in enumerate(networks_before))


def test_finished_cases_are_skipped_without_being_read(recorder, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"old")
    results = pipeline.run_cases([Case("a", files=[]), Case("b", files=[])], spec=SPEC, predict=_predict(recorder),
                                 output_dir=out, fast_export=False)
    assert [r.status for r in results] == ["skipped", "done"]
    assert ("prepared", "a") not in recorder.events and (out / "a.nii.gz").read_bytes() == b"old"
