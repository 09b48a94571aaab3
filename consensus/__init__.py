"""Consensus of dermatologists: Dawid-Skene EM, STAPLE, agreement statistics, the SQL store, export.

numpy / pandas / SQLAlchemy only: imports neither torch, Flask nor ``model`` / ``backend``.
"""
