"""Files that are not checkpoints, for the tests of how loading one fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def bad_checkpoint(tmp_path, kind: str) -> Path:
    """A file named model.pt that is empty, text, random bytes, a folder, a dict without the keys, or a tensor."""
    path = tmp_path / "model.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file named .pt\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "folder":
        path.mkdir()
    elif kind == "no-keys":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path
