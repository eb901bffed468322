"""Label-free distillation fine-tuning of a decomposed bundle (``tucker-export finetune``).

The original nnU-Net network is the teacher, the bundle's factorized network the student. Both see
the same tiles: patch-sized crops of the user's own scans after the bundle's nnU-Net preprocessing
(``engines.cpu_gate.tiles_from_scans``, seeded). The teacher's logits are computed once; only the
student's Tucker factors and cores train (``--train-norms`` adds the normalisation layers).

Loss: the Kullback-Leibler divergence from the teacher's softmax to the student's, per voxel,
averaged. It is nnU-Net's own cross-entropy term with the teacher's soft outputs as targets (up to
the teacher's constant entropy), so it weighs what decides the segmentation, the ranking of
classes per voxel. MSE on logits was not chosen: it spends the small step budget matching the
scale of logits that no argmax reads (deep background, far below the winning class).

A held-out share of the tiles (from the last scans read) never trains; every ``eval_every`` steps
the student is compared with the teacher there (argmax agreement, Dice per class), and the best
state by mean Dice is kept. When no step beats the bundle as it was, its weights are kept and the
run says so. The new bundle is written in a staging folder and only replaces its target when
everything succeeded, so Ctrl-C leaves the original bundle as it was.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tucker_export.bundle import Bundle, fold_key, model_checksum, staged_bundle_dir, utc_now
from tucker_export.errors import BundleError, ConfigurationError
from tucker_export.exporter.rebuild import build_network

logger = logging.getLogger(__name__)

LOSS_NAME = "kl(teacher softmax || student softmax), mean over voxels"


@dataclass(frozen=True)
class FinetuneSettings:
    """What one fine-tuning run does; recorded in ``bundle.json`` with its results."""

    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 2
    train_tiles: int = 96
    held_out_tiles: int = 16
    eval_every: int = 25
    seed: int = 0
    train_norms: bool = False
    max_minutes: float | None = None
    device: str = "cpu"

    def validate(self) -> FinetuneSettings:
        for name in ("steps", "batch_size", "train_tiles", "held_out_tiles", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"The fine-tuning {name.replace('_', ' ')} must be an integer >= 1, got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigurationError(f"The learning rate must be in (0, 1), got {self.lr!r}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigurationError(f"The time limit must be a positive number of minutes, got {self.max_minutes!r}.")
        return self


@dataclass
class Agreement:
    """Student vs teacher on the held-out tiles."""

    argmax_agreement: float
    mean_dice: float
    dice_per_class: dict[str, float]

    def better_than(self, other: Agreement) -> bool:
        return (self.mean_dice, self.argmax_agreement) > (other.mean_dice, other.argmax_agreement)


@dataclass
class FoldResult:
    fold: str
    before: Agreement
    after: Agreement
    best_step: int
    steps_run: int
    seconds: float
    improved: bool
    trainable_parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


# ---- pieces (plain functions, tested one by one) --------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the class axis (1), averaged over batch and voxels."""
    teacher_log_p = torch.log_softmax(teacher_logits, dim=1)
    student_log_p = torch.log_softmax(student_logits, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1).mean()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, num_classes: int) -> Agreement:
    """Argmax agreement and Dice per foreground class (classes the teacher predicts anywhere in the tiles)."""
    from tucker_export.validation.metrics import dice_score

    student = student_logits.argmax(1).cpu().numpy()
    teacher = teacher_logits.argmax(1).cpu().numpy()
    per_class = {}
    for label in range(1, num_classes):
        if (teacher == label).any():
            per_class[str(label)] = float(dice_score(teacher == label, student == label))
    mean = float(np.mean(list(per_class.values()))) if per_class else 1.0
    return Agreement(float((student == teacher).mean()), mean, per_class)


def trainable_parameters(network: torch.nn.Module, *, train_norms: bool) -> list[torch.nn.Parameter]:
    """Freeze everything but the Tucker layers' factors and cores (and the norms with ``train_norms``)."""
    from tucker_export.exporter.tucker import TuckerConv

    for parameter in network.parameters():
        parameter.requires_grad_(False)
    chosen: dict[int, torch.nn.Parameter] = {}
    for module in network.modules():
        is_norm = isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm))
        if isinstance(module, TuckerConv) or (train_norms and is_norm):
            for parameter in module.parameters():
                chosen[id(parameter)] = parameter
    for parameter in chosen.values():
        parameter.requires_grad_(True)
    return list(chosen.values())


def supervised_loss():
    """nnU-Net's own training loss (soft Dice + cross-entropy, background excluded from the Dice)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def _logits(network: torch.nn.Module, tiles: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([network(tiles[i:i + batch]) for i in range(0, len(tiles), batch)])


def distill_fold(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    train: torch.Tensor,
    held_out: torch.Tensor,
    settings: FinetuneSettings,
    *,
    num_classes: int,
    fold: str = "0",
    progress: bool = False,
    train_labels: torch.Tensor | None = None,
) -> FoldResult:
    """Train ``student`` towards ``teacher`` on ``train``; leaves it in its best held-out state.

    With ``train_labels`` (``(N, 1, *patch)``, aligned with ``train``) nnU-Net's loss against them
    is added to the distillation term.
    """
    from tqdm.auto import tqdm

    device = torch.device(settings.device)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    train, held_out = train.to(device), held_out.to(device)
    # Norms run in eval mode: nnU-Net's InstanceNorm has no running statistics, and a BatchNorm's
    # must not drift on a batch of two tiles.
    train_targets = _logits(teacher, train, settings.batch_size)
    held_targets = _logits(teacher, held_out, settings.batch_size)
    labelled = supervised_loss() if train_labels is not None else None
    parameters = trainable_parameters(student, train_norms=settings.train_norms)
    if not parameters:
        raise BundleError(f"Fold {fold} of the bundle has no factorized layer to fine-tune.")
    before = agreement(_logits(student, held_out, settings.batch_size), held_targets, num_classes)
    best, best_step = before, 0
    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    history = [{"step": 0, "mean_dice": before.mean_dice, "argmax_agreement": before.argmax_agreement}]
    started = time.perf_counter()
    deadline = started + settings.max_minutes * 60 if settings.max_minutes else None
    step = 0
    bar = tqdm(total=settings.steps, desc=f"fine-tune fold {fold}", unit="step", disable=not progress, leave=False)
    for step in range(1, settings.steps + 1):
        index = torch.randint(len(train), (settings.batch_size,), generator=generator).to(device)
        output = student(train[index])
        loss = distillation_loss(output, train_targets[index])
        if labelled is not None:
            loss = loss + labelled(output, train_labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
        out_of_time = deadline is not None and time.perf_counter() > deadline
        if step % settings.eval_every == 0 or step == settings.steps or out_of_time:
            now = agreement(_logits(student, held_out, settings.batch_size), held_targets, num_classes)
            history.append({"step": step, "loss": loss.item(), "mean_dice": now.mean_dice,
                            "argmax_agreement": now.argmax_agreement})
            bar.set_postfix(loss=f"{loss.item():.4f}", dice=f"{now.mean_dice:.4f}")
            logger.debug("fold %s step %d: loss %.5f, held-out mean Dice %.4f", fold, step, loss.item(), now.mean_dice)
            if now.better_than(best):
                best, best_step = now, step
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if out_of_time:
            logger.info("Fold %s: time limit reached after %d steps.", fold, step)
            break
    bar.close()
    student.load_state_dict(best_state)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    return FoldResult(
        fold=fold, before=before, after=best, best_step=best_step, steps_run=step,
        seconds=round(time.perf_counter() - started, 2), improved=best_step > 0,
        trainable_parameters=sum(p.numel() for p in parameters), history=history,
    )


# ---- the teacher ---------------------------------------------------------------------------------


def load_teacher(bundle: Bundle, folds: Sequence[Any], teacher_dir: str | Path | None = None):
    """The original model the bundle was decomposed from, checked against its recorded checksum."""
    from tucker_export.nnunet.loading import load_trained_model

    source = bundle.source
    model_dir = Path(teacher_dir or source["model_dir"])
    if not model_dir.is_dir():
        raise BundleError(
            f"The teacher (the original model {model_dir} this bundle was decomposed from) is not here; "
            f"give its folder with --teacher DIR."
        )
    checkpoint_name = source.get("checkpoint_name") or "checkpoint_final.pth"
    recorded_folds = source.get("folds") or [fold_key(f) for f in bundle.folds]
    checkpoints = [model_dir / f"fold_{f}" / checkpoint_name for f in recorded_folds]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        raise BundleError(f"The teacher folder {model_dir} lacks {', '.join(missing)}; give the original model with --teacher DIR.")
    actual = model_checksum(model_dir, checkpoints)
    if actual != source["checksum"]:
        raise BundleError(
            f"The teacher folder {model_dir} is not the model this bundle was made from (checksum {actual[:12]}..., "
            f"the bundle records {source['checksum'][:12]}...); give the original model with --teacher DIR."
        )
    return load_trained_model(model_dir, list(folds), checkpoint_name=checkpoint_name)


# ---- the command ---------------------------------------------------------------------------------


@dataclass
class FinetuneReport:
    bundle: str
    output: str
    settings: dict[str, Any]
    tiles: dict[str, Any]
    folds: list[FoldResult]

    @property
    def improved(self) -> bool:
        return any(f.improved for f in self.folds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune_bundle(
    bundle_path: str | Path,
    scans: str | Path,
    *,
    output: str | Path | None = None,
    folds: Sequence[Any] | None = None,
    settings: FinetuneSettings | None = None,
    teacher_dir: str | Path | None = None,
    labels_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> FinetuneReport:
    """Distil the original model into ``bundle_path``'s factorized folds on the unlabeled ``scans``.

    Writes ``output`` (default: the bundle itself, replaced only on success) with the new weights and
    a ``finetuning`` record; ONNX exports of the old weights stay listed but are refused until re-exported.
    ``labels_dir`` (optional; label maps ``<case><file ending>``) adds nnU-Net's supervised loss.
    """
    from safetensors.torch import save_file

    from tucker_export.engines.cpu_gate import tiles_from_scans
    from tucker_export.exporter.tucker import deduplicated_state_dict
    from tucker_export.inference import parse_device

    settings = (settings or FinetuneSettings()).validate()
    parse_device(settings.device)
    bundle = Bundle.load(bundle_path)
    selected = bundle.resolve_folds(list(folds) if folds else None)
    target = Path(output) if output is not None else bundle.path
    in_place = target.resolve() == bundle.path.resolve()
    if not in_place:
        from tucker_export.bundle import check_bundle_target

        check_bundle_target(target, overwrite=overwrite)
    if not Path(scans).is_dir():
        raise ConfigurationError(f"Scans folder {scans} does not exist; point -i at a folder of the deployment's scans.")
    teacher = load_teacher(bundle, selected, teacher_dir)
    tiles = tiles_from_scans(bundle, scans, settings.train_tiles + settings.held_out_tiles, seed=settings.seed,
                             progress=progress, labels_dir=labels_dir)
    if len(tiles) < 2:
        raise ConfigurationError(f"Fine-tuning needs at least 2 tiles, {scans} gave {len(tiles)}.")
    n_held = min(settings.held_out_tiles, max(1, len(tiles) // 5))
    array = torch.from_numpy(tiles.array)
    train, held_out = array[:-n_held], array[-n_held:]
    train_labels = torch.from_numpy(tiles.labels[:-n_held]).long() if tiles.labels is not None else None
    results: list[FoldResult] = []
    with staged_bundle_dir(target, overwrite=True) as staging:
        shutil.copytree(bundle.path, staging, dirs_exist_ok=True)
        staged = bundle.copy_to(staging)
        for fold in selected:
            student = build_network(bundle, fold)
            result = distill_fold(
                teacher.networks[fold], student, train, held_out, settings,
                num_classes=bundle.num_segmentation_heads, fold=str(fold), progress=progress,
                train_labels=train_labels,
            )
            teacher.networks[fold] = None
            results.append(result)
            _log_fold(result)
            if not result.improved:
                continue
            save_file(deduplicated_state_dict(student.cpu()), str(staged.weights_path(fold)))
            staged.refresh_weights(fold)
        report = FinetuneReport(str(bundle.path), str(target), asdict(settings), tiles.source, results)
        staged.add_finetuning(_record(bundle, report, train_count=len(train), held=n_held))
        staged.save()
    return report


def _log_fold(result: FoldResult) -> None:
    if result.improved:
        logger.info(
            "Fold %s: held-out mean Dice vs the original %.4f -> %.4f, argmax agreement %.4f -> %.4f "
            "(best at step %d of %d, %.0f s).", result.fold, result.before.mean_dice, result.after.mean_dice,
            result.before.argmax_agreement, result.after.argmax_agreement, result.best_step, result.steps_run,
            result.seconds,
        )
    else:
        logger.warning(
            "Fold %s: no step improved the held-out agreement with the original (mean Dice %.4f); its weights are "
            "kept as they were.", result.fold, result.before.mean_dice,
        )


def _record(bundle: Bundle, report: FinetuneReport, *, train_count: int, held: int) -> dict[str, Any]:
    """The ``finetuning`` entry of ``bundle.json``: enough to know what was done and to redo it."""
    return {
        "created": utc_now(),
        "method": "distillation" + (" + nnU-Net loss on labels" if "labels" in report.tiles else ""),
        "loss": LOSS_NAME,
        "teacher": {"model_dir": bundle.source["model_dir"], "checksum": bundle.source["checksum"]},
        "scans": {**report.tiles, "train_tiles": train_count, "held_out_tiles": held},
        "settings": report.settings,
        "folds": {
            r.fold: {
                "improved": r.improved, "best_step": r.best_step, "steps_run": r.steps_run, "seconds": r.seconds,
                "trainable_parameters": r.trainable_parameters,
                "before": asdict(r.before), "after": asdict(r.after),
            }
            for r in report.folds
        },
    }


def format_finetune_report(report: FinetuneReport) -> str:
    """The table ``tucker-export finetune`` prints: held-out agreement with the original, per fold."""
    lines = [f"{'fold':<6}{'mean Dice before':>18}{'after':>9}{'argmax before':>15}{'after':>9}{'best step':>11}{'seconds':>9}"]
    for r in report.folds:
        lines.append(
            f"{r.fold:<6}{r.before.mean_dice:>18.4f}{r.after.mean_dice:>9.4f}{r.before.argmax_agreement:>15.4f}"
            f"{r.after.argmax_agreement:>9.4f}{r.best_step:>11}{r.seconds:>9.0f}"
        )
    verdict = (f"Wrote {report.output}; re-export its ONNX (`tucker-export export {report.output}`) before `infer`."
               if report.improved else f"No fold improved; {report.output} keeps the weights it had.")
    return "\n".join([*lines, verdict])
