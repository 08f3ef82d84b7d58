"""Evaluation: attacks and the attack ensemble, clinical metrics, corruptions and OOD tables, saliency, shortcut
tests, test-time adaptation, statistics, and evaluating a checkpoint.
"""
