"""The built-in demo: a small nnU-Net v2 model trained (once, on the CPU) on synthetic CT-like phantoms.

``ensure_demo_model()`` returns it, building it into the cache on first use; see :mod:`.build` for the
recipe (:mod:`.recipe`, :mod:`.dataset` and :mod:`.training` for its parts) and :mod:`.phantom` for the
data. Importing this package is cheap: torch and nnU-Net are only imported when a model is built or used.
"""

from tucker_export.demo.build import DemoModel, demo_cache_dir, ensure_demo_model
from tucker_export.demo.phantom import LABEL_NAMES, PhantomCase, generate_phantom
from tucker_export.demo.recipe import (
    CONFIGURATION,
    DATASET_NAME,
    PLANS_NAME,
    RECIPE_VERSION,
    TRAINER_NAME,
    trainer_search_path,
)

__all__ = [
    "CONFIGURATION",
    "DATASET_NAME",
    "LABEL_NAMES",
    "PLANS_NAME",
    "RECIPE_VERSION",
    "TRAINER_NAME",
    "DemoModel",
    "PhantomCase",
    "demo_cache_dir",
    "ensure_demo_model",
    "generate_phantom",
    "trainer_search_path",
]
