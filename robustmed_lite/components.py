"""One registry per part of a defence, each with one signature: a new part is added in one place.

Five parts make every method of the book (``config.METHODS`` names a choice of each), and each has a registry
here. The command line's choices (``config.CHOICES``), the checks of ``TrainConfig.resolve`` and the methods
table (``config.methods_table``) are read from these registries, so a part registered in a notebook cell is at
once a valid ``--loss`` (or ``--attack`` ...) for ``Trainer`` and for ``python -m robustmed_lite train`` in
the same process. (``reproduce`` trains in spawned processes, which see only the built-in parts and those
registered at import time of a module they import.)

=================  ==================================  =========================================================
part               register with                       signature
=================  ==================================  =========================================================
sample attack      ``@register_attack(name)``          ``make(cfg, steps) -> attack | None``; the attack is
                                                       called ``attack(model, x, y) -> x_adv`` (eval mode,
                                                       detached, in [0, 1]); ``cfg.feedback`` names the rule
feedback rule      ``@register_feedback(name)``        a ``FeedbackRule`` subclass (``method.feedback_attack``),
                                                       built per attack call as ``Rule(x, steps, tau)``; it sees
                                                       each iterate and says which samples stop
weight noise       ``@register_weight_noise(name)``    ``make(model, cfg) -> noise`` with ``compute_batch(batch)
                                                       -> direction``, ``perturb(direction, gamma)``,
                                                       ``restore()``, ``applied(direction, gamma)``,
                                                       ``state_dict()``, ``load_state_dict(state)`` (as
                                                       ``weight_perturbation.WeightPerturbation``); a
                                                       ``gradient_sync`` attribute to train under torchrun
loss               ``@register_loss(name)``            ``loss(model, batch, cfg) -> scalar tensor``; the model
                                                       is in train mode and, with weight noise, perturbed
prior view         ``@register_prior_view(name)``      ``view(x, dark, radius, eps, s, backend) -> x_aug``: the
                                                       lung-prior view of a batch in [0, 1] (``dark``: the
                                                       bool mask x <= threshold)
=================  ==================================  =========================================================

``batch`` is a ``Batch``: ``x`` (clean), ``x_adv`` (the sample attack's output, or None), ``x_aug`` (the prior
view, or x itself for methods without a prior) and ``y``, all on the training device. ``cfg`` is the resolved
``TrainConfig``: a part reads its settings from it (beta, gamma, smooth, ...).

Example, one notebook cell::

    from robustmed_lite.components import register_loss
    from robustmed_lite.method.objectives import trades_loss

    @register_loss("my_loss", needs_attack=True, description="TRADES with KL on the prior view")
    def my_loss(model, batch, cfg):
        logits = model(batch.x).float()
        return trades_loss(logits, model(batch.x_adv).float(), batch.y, cfg.beta)

    Trainer(load_config("cpu-demo", {"method": "trades", "loss": "my_loss"})).fit()
    # or: python -m robustmed_lite train --method trades --loss my_loss  (via __main__.main([...]) in-process)

Methods are registered the same way (``register_method("name", attack=..., loss=..., ...)``): a method is a
row of values of the method fields (``config.METHOD_FIELDS``: the components and the switches whose
``TrainConfig`` default is None), and fields left at None take the method's value.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Modules whose import registers the built-in parts (imported on first use of any registry, so that this module
# imports nothing from the package at import time and every module can import it).
_BUILTIN_MODULES = (
    "method.feedback_attack",
    "method.objectives",
    "method.weight_perturbation",
    "method.prior",
    "config",
)
_builtins_loaded = False
_MISSING = object()  # "no object given": register() returns a decorator (None is a valid part: "no attack")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")


def _caller_module() -> str:
    """The module that called into this one (the first frame outside it)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


@dataclass(frozen=True)
class Entry:
    """A registered part: its object, a one-line description, and part-specific facts (``info``)."""

    name: str
    obj: Any
    description: str = ""
    info: dict = field(default_factory=dict)


class Registry(Mapping):
    """Name -> part, in registration order. Reading a registry loads the built-in parts first.

    Args:
        part: What the registry holds, for messages ("loss", "sample attack", ...).
        signature: The signature every entry has, for messages and docs.
    """

    def __init__(self, part: str, signature: str):
        self.part, self.signature = part, signature
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Any = _MISSING, *, description: str = "", replace: bool = False, **info):
        """Registers ``obj`` under ``name`` (None too: e.g. the part "none"); without ``obj`` returns a decorator.

        Raises:
            ValueError: The name is taken (pass ``replace=True`` to overwrite it on purpose) or not a plain word.
        """
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a {self.part} name is a word of letters, digits, '_' or '-', got {name!r}")

        def add(target):
            # A user's part: the built-ins first, so that a clash is reported here, not when they load later.
            # (Not for the built-in modules' own registrations, which run while those modules import.)
            if _caller_module() not in {f"{__package__}.{m}" for m in _BUILTIN_MODULES}:
                _load_builtins()
            if name in self._entries and not replace:
                raise ValueError(
                    f"{self.part} {name!r} is already registered: choose another name, or pass "
                    "replace=True to overwrite it"
                )
            self._entries[name] = Entry(name, target, description or _first_line(target), dict(info))
            return target

        return add if obj is _MISSING else add(obj)

    def unregister(self, name: str) -> None:
        """Removes a registered part (for tests and notebooks that clean up after themselves)."""
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry:
        """The registered entry, or a ValueError that lists the choices."""
        _load_builtins()
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.part} {name!r}: choose one of {', '.join(self._entries)} (or "
                f"register one: {self.signature})"
            )
        return self._entries[name]

    def __getitem__(self, name: str):
        return self.entry(name).obj

    def __iter__(self) -> Iterator[str]:
        _load_builtins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        _load_builtins()
        return len(self._entries)

    def __contains__(self, name) -> bool:
        _load_builtins()
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return f"<{self.part} registry: {', '.join(self)}>"


def _first_line(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


@dataclass
class Batch:
    """What a training step hands to the parts: the clean batch, its adversarial version (or None), its
    lung-prior view (x itself for methods without a prior) and the labels, aligned by index."""

    x: torch.Tensor
    x_adv: torch.Tensor | None
    x_aug: torch.Tensor
    y: torch.Tensor


ATTACKS = Registry("sample attack", "make(cfg, steps) -> attack(model, x, y) -> x_adv, or None")
FEEDBACK = Registry("feedback rule", "a feedback_attack.FeedbackRule subclass: Rule(x, steps, tau)")
WEIGHT_NOISE = Registry(
    "weight noise",
    "make(model, cfg) -> object with compute_batch(batch), perturb(direction, "
    "gamma), restore(), applied(direction, gamma), state_dict, load_state_dict",
)
LOSSES = Registry("loss", "loss(model, batch, cfg) -> scalar tensor")
PRIOR_VIEWS = Registry("prior view", "view(x, dark, radius, eps, s, backend) -> x_aug")
METHOD_REGISTRY = Registry(
    "method", "register_method(name, attack=..., feedback=..., weight_noise=..., loss=..., prior=..., ...)"
)


def register_attack(name: str, make: Callable | None = _MISSING, *, description: str = "", replace: bool = False):
    """Registers a sample attack: ``make(cfg, steps) -> attack | None`` (``attack(model, x, y) -> x_adv``)."""
    return ATTACKS.register(name, make, description=description, replace=replace)


def register_feedback(name: str, rule: type | None = _MISSING, *, description: str = "", replace: bool = False):
    """Registers a feedback (early-stopping) rule of the sample attack: a ``method.feedback_attack.FeedbackRule``
    subclass."""
    return FEEDBACK.register(name, rule, description=description, replace=replace)


def register_weight_noise(name: str, make: Callable | None = _MISSING, *, description: str = "", replace: bool = False):
    """Registers a weight noise: ``make(model, cfg) -> noise`` (see the module docstring for its methods)."""
    return WEIGHT_NOISE.register(name, make, description=description, replace=replace)


def register_loss(
    name: str,
    loss: Callable | None = _MISSING,
    *,
    needs_attack: bool = False,
    description: str = "",
    replace: bool = False,
):
    """Registers a training loss: ``loss(model, batch, cfg) -> scalar``.

    Args:
        needs_attack: The loss reads ``batch.x_adv``: ``TrainConfig.resolve`` then refuses ``attack='none'``.
    """
    return LOSSES.register(name, loss, description=description, replace=replace, needs_attack=needs_attack)


def register_prior_view(
    name: str,
    view: Callable | None = _MISSING,
    *,
    flip_equivariant: bool = False,
    description: str = "",
    replace: bool = False,
):
    """Registers a lung-prior view: ``view(x, dark, radius, eps, s, backend) -> x_aug``.

    Args:
        flip_equivariant: The view of a flipped image is the flipped view (true for symmetric windows): the
            dataset may then flip a precomputed view; otherwise it computes the view of each flipped image.
    """
    return PRIOR_VIEWS.register(name, view, description=description, replace=replace, flip_equivariant=flip_equivariant)


def register_method(name: str, *, description: str = "", replace: bool = False, **components) -> dict:
    """Registers a method: a row of values of ``config.METHOD_FIELDS`` that a ``TrainConfig`` takes where the
    user left the field at None (others take ``config.COMPONENT_DEFAULTS``). Returns the row."""
    row = dict(components)
    METHOD_REGISTRY.register(name, row, description=description, replace=replace)
    return row
