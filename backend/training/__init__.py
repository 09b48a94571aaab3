"""Retraining: the job queue (in-process or RQ) and the training of each served system from the consensus."""
