"""Progress bars in a log file: each redraw shows its current counter, at most every LOG_PROGRESS_INTERVAL seconds."""

import re
import sys

import tqdm.std
from _small import SIZES

from robustmed_lite import runinfo
from robustmed_lite.config import load_config
from robustmed_lite.trainer import Trainer

# One epoch of 8 steps of ERM on the 32 px phantom.
ONE_EPOCH = dict(SIZES, method="erm", batch_size=8, epochs=1, eval_n=8, eval_attack_steps=1, progress=True)


class FakeClock:
    """tqdm's clock, moved on only by the training steps."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _training_bar_draws(text: str) -> list[tuple[int, str]]:
    """(counter, loss) of each redraw of the training bar (``erm 1/1: ...| 3/8 [..., loss=0.6931]``)."""
    draws = []
    for segment in re.split(r"[\r\n]", text):
        match = re.search(r"erm 1/1:.*\| *(\d+)/8 \[.*loss=([0-9.]+)", segment)
        if match:
            draws.append((int(match.group(1)), match.group(2)))
    return draws


def test_a_training_bar_in_a_log_file_advances_and_redraws_every_interval(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # read by each bar when it is made
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        monkeypatch.setattr(sys, "stderr", log)  # a file, not a terminal: the log settings apply
        trainer = Trainer(load_config("cpu-demo", dict(ONE_EPOCH, out_dir=str(tmp_path / "run"))))
        step = trainer.train_step

        def four_seconds_step(*args, **kwargs):
            clock.now += 4.0
            return step(*args, **kwargs)

        monkeypatch.setattr(trainer, "train_step", four_seconds_step)
        trainer.fit()
    draws = _training_bar_draws(log_path.read_text())
    # 8 steps of 4 s and a redraw at most every 10 s: after steps 3 (12 s) and 6 (24 s), each with its own
    # counter; no redraw per step with the counter of the last timed redraw (0/8 for the first 10 s).
    assert runinfo.LOG_PROGRESS_INTERVAL == 10.0
    assert [counter for counter, _ in draws] == [3, 6], draws


def test_a_terminal_bar_stays_interactive():
    class Terminal:
        def isatty(self):
            return True

    options = runinfo.progress_options(True, Terminal())
    assert options == {"disable": False}  # tqdm's own redraws, ten a second
