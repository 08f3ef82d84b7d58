"""robustmed-lite: robust lung-CT classification, from data to honest evaluation.

The subpackages follow the data flow::

    data/        loaders (folders, CSV, DICOM, NIfTI), phantom, preprocessing, slice store, splits
    method/      prior (guided filter) -> feedback_attack -> weight_perturbation -> objectives
    trainer      one loop for every method (config + components), checkpoints, distributed
    evaluation/  attacks, ensemble, metrics, corruptions, OOD, saliency, shortcuts, adaptation, stats
    studies/     reproduction, cross-site, fidelity, ablation (plan -> run_evaluation -> summary)
    figures      every plot of the book and the studies
    book/        shipped runs, notebook setup, workshop checks, doctor
    cli          ``python -m robustmed_lite``
"""

__version__ = "0.1.0"
