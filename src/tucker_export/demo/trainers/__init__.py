"""External nnU-Net trainers shipped with tucker-export.

nnU-Net 2.8 finds trainers outside its own package through the ``nnUNet_extTrainer`` environment
variable: point it at this folder (``tucker_export.demo.trainer_search_path()``) and
``nnUNetv2_train``/``nnUNetv2_predict`` import ``nnUNetTrainer_TuckerDemo`` from here as a top-level
module. The trainer module therefore imports nothing from tucker_export.
"""
