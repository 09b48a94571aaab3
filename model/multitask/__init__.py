"""Matas et al. (arXiv:2407.00104): MobileNet-V2 multitask BCC model (BCC + seven patterns) with Grad-CAM."""
