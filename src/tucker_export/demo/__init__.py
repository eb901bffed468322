"""The built-in demo: an nnU-Net v2 model of real head-and-neck CT that ships with the package.

``ensure_demo_model()`` returns it (:mod:`.shipped`) with a few real held-out patients and their
clinical contours; nothing is trained on first use. :mod:`.retrain` is the recipe that made it from
the OpenKBP data set (:mod:`.openkbp`) through nnU-Net's own pipeline (:mod:`.nnunet_run`), and
:mod:`.recipe` names its parts. :mod:`.phantom` generates synthetic CT-like phantoms for unit tests
that need a known geometry. Importing this package is cheap: torch and nnU-Net are imported only
when a model is trained or used.
"""

from tucker_export.demo.phantom import PhantomCase, generate_phantom
from tucker_export.demo.recipe import (
    CONFIGURATION,
    DATASET_NAME,
    LABEL_NAMES,
    PLANS_NAME,
    RECIPE_VERSION,
    TRAINER_NAME,
    trainer_search_path,
)
from tucker_export.demo.shipped import SHIPPED_ROOT, DemoModel, ensure_demo_model

__all__ = [
    "CONFIGURATION",
    "DATASET_NAME",
    "LABEL_NAMES",
    "PLANS_NAME",
    "RECIPE_VERSION",
    "SHIPPED_ROOT",
    "TRAINER_NAME",
    "DemoModel",
    "PhantomCase",
    "ensure_demo_model",
    "generate_phantom",
    "trainer_search_path",
]
