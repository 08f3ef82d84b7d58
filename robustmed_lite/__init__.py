"""robustmed-lite: robust lung-CT classification, from data to honest evaluation.

Data flow, one module each: ``phantom`` / ``data`` -> ``prior`` -> ``attacks`` -> ``perturbation`` ->
``objectives`` -> ``trainer`` -> ``evaluate`` / ``corruptions`` / ``explain`` -> ``figures``.
"""

__version__ = "0.1.0"
