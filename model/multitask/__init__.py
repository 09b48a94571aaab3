"""Matas et al. (arXiv:2407.00104): MobileNet-V2 multitask BCC model (BCC + seven patterns) with Grad-CAM.

:mod:`~model.multitask.network` (DermNet and its checkpoints), :mod:`~model.multitask.train`,
:mod:`~model.multitask.calibrate` (temperatures and thresholds), :mod:`~model.multitask.evaluate` (the
paper's metrics and the report).
"""
