"""Studies on real CT and the phantom: reproduction, cross-site, fidelity and ablation, with their shared run
planning (``plan``), run evaluation (``run_evaluation``) and summaries (``summary``).
"""
