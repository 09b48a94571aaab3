"""PyTorch side of dermassist: the two published systems, what they share, and synthetic dermoscopy.

- ``model.multitask``: Matas et al. (arXiv:2407.00104), a MobileNet-V2 with a BCC head and seven
  dermoscopic-pattern heads, Grad-CAM from one pass, trained on consensus posteriors.
- ``model.lesion``: Atiq & Fattah (arXiv:2510.17773), a U-Net with dual attention gates and ASPP that
  outlines the lesion, and a dual-encoder + metadata classifier of the seven HAM10000 diagnoses.
- ``model.common``: what both use: data tables and splits, the one checkpoint format, the one training
  skeleton, the report writer, provenance of outputs, Grad-CAM.
- ``model.systems``: the served systems by the name their checkpoints carry; ``load(path)`` gives any
  checkpoint's network and metadata.
- ``model.synthetic``: synthetic dermoscopy and simulated raters, for tests and for what real data
  cannot give. No served model imports it.

Imports only ``labeling_config`` from the project (never ``consensus`` or ``backend``).
"""
