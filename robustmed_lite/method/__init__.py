"""The method's four parts: the lung-cavity prior (``prior``), sample perturbation with prediction feedback
(``feedback_attack``), weight perturbation (``weight_perturbation``: AWP and the proxy attention weight noise), and the
objectives (``objectives``: the method's square loss and the baselines' losses).
"""
