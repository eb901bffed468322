"""Safe loading of nnU-Net checkpoints.

nnU-Net saves whole training states with ``torch.save`` (network weights, optimizer state, the
init arguments, logging lists). nnU-Net itself reads them with ``weights_only=False``, which runs
arbitrary pickled code. We read them with ``weights_only=True`` and allow-list exactly the
non-tensor types a stock nnU-Net checkpoint holds; anything else is refused with its name, unless
the user opts in with ``trust_checkpoint=True`` (CLI: ``--trust-checkpoint``).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

from tucker_export.errors import CheckpointError

logger = logging.getLogger(__name__)



def _allowed_globals() -> list[Any]:
    """The non-tensor types found in checkpoints written by nnU-Net v2 trainers.

    numpy scalars and dtypes appear in the training log (``logging``) and ``_best_ema``;
    ``torch.device`` in ``init_args``. They only rebuild plain values, never run code.
    """
    import numpy as np
    import torch

    allowed: list[Any] = [np.dtype, torch.device]
    try:  # numpy >= 2 moved the scalar reconstructor; pickles name whichever wrote them
        from numpy._core.multiarray import scalar as np2_scalar

        allowed.append(np2_scalar)
    except ImportError:  # pragma: no cover - numpy 1.x
        pass
    try:
        from numpy.core.multiarray import scalar as np1_scalar  # type: ignore[attr-defined]

        allowed.append(np1_scalar)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    allowed.extend(dtype_classes)
    return allowed


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_checkpoint(path: str | Path, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Load an nnU-Net checkpoint onto the CPU without executing pickled code.

    With ``trust_checkpoint=True`` the allow-list is bypassed (full pickle); only do that for
    checkpoints from a source you trust.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        if trust_checkpoint:
            logger.warning("Loading %s with full pickle (the checkpoint is trusted): it can run code.", path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_allowed_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = _UNSUPPORTED_GLOBAL.search(str(error))
        offending = match.group(1) if match else "an object type outside the allow-list"
        raise CheckpointError(
            f"Checkpoint {path} contains {offending}, which safe loading does not allow; trust the checkpoint "
            f"only if you trust where this file came from.", option="trust_checkpoint", use=True,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"Checkpoint {path} cannot be read ({_first_line(error)}); is the file complete?") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(
            f"Checkpoint {path} is not an nnU-Net training checkpoint (no 'network_weights' entry)."
        )
    return checkpoint


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
