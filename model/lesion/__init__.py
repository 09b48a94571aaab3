"""Atiq & Fattah (arXiv:2510.17773): lesion U-Net (dual attention gates, ASPP) and the dual-encoder +
metadata classifier of the seven HAM10000 diagnoses.

- the U-Net: :mod:`~model.lesion.unet` (the network), :mod:`~model.lesion.masks` (its loss and mask
  metrics), :mod:`~model.lesion.segmentation` (its checkpoints and builder),
  :mod:`~model.lesion.train_seg`, :mod:`~model.lesion.evaluate_seg`;
- the classifier: :mod:`~model.lesion.dual` (the network and its checkpoints),
  :mod:`~model.lesion.train_dual`, :mod:`~model.lesion.evaluate_dual`.
"""
