"""The serving core: the registry of model versions, the holder of what is served, one engine per system."""
