"""PyTorch side of dermassist: networks, datasets, synthetic dermoscopy, training and explanations.

Imports only ``labeling_config`` from the project (never ``consensus`` or ``backend``).
"""
