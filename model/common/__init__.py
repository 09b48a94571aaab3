"""What both systems share: data tables and splits, the checkpoint format, provenance, Grad-CAM."""
