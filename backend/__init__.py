"""The Label Studio side of dermassist: the ML-backend service, ingestion, sync and the CLI.

The only package that knows Label Studio JSON; it imports ``model``, ``consensus`` and
``labeling_config``, never the other way round.
"""
