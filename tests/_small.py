"""The smallest training that still runs every part of a method (seconds an epoch on a CPU), shared by the
tests that train: as config values (``SMALL``) and as command-line options (``options``)."""

from __future__ import annotations

# 32 px phantom, 64 training slices, two epochs, two-step attacks.
SIZES = dict(img_size=32, n_train=64, n_val=32, n_test=32, batch_size=32, eval_n=16)
SMALL = dict(
    SIZES, epochs=2, attack_steps=2, eval_attack_steps=2, progress=False, eps="8/255", step_size="2/255", gamma=0.01
)


def options(**settings) -> list[str]:
    """``--KEY VALUE`` command-line options for config values (booleans as true/false)."""
    pairs = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in settings.items()]
    return [item for key, value in pairs for item in (f"--{key}", value)]


# The command line's tiny run: SMALL's sizes and attack steps, no progress bars.
TINY_OPTIONS = options(**SIZES, attack_steps=2, eval_attack_steps=2, progress=False)
