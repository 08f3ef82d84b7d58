"""Calibration of the corruption severities: what severity 5 does to a clean ERM model, and is the slice still readable?

For every corruption and severity: the accuracy of the book's ERM model (cpu-demo preset, phantom site A, 64 px,
trained or reused under notebooks/runs/book, where the notebooks keep it) on the phantom validation split (never
the test split, which notebook 06 reports on), the mean absolute change to the image, and the lung-mask Dice of
the corrupted slice against the ground truth (a proxy for "the anatomy is still there"; Otsu's threshold per
slice, so that an intensity shift alone does not erase the mask). With ../shared/data present, the change and the
Dice against the clean slice's own mask are also measured on real CT.

Usage: python benchmarks/calibrate_corruptions.py [--n 256] [--runs notebooks/runs/book]
Writes benchmarks/results/corruptions_calibration.json.
"""

import argparse

import torch
from _harness import results_file, write_record

from robustmed_lite.book.runs import selected_checkpoint, train_or_load
from robustmed_lite.checkpoints import model_from_checkpoint
from robustmed_lite.data.loaders import find_shared_data, load_images
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.corruptions import CORRUPTIONS, FAMILY_OF, SEVERITIES, corrupt
from robustmed_lite.evaluation.metrics import accuracy
from robustmed_lite.method.prior import dice, lung_mask
from robustmed_lite.runinfo import environment_info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--runs", default="notebooks/runs/book", help="the book's runs (trained if missing)")
    parser.add_argument("--out", default=str(results_file("corruptions_calibration.json")))
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    trainer = train_or_load("erm", "cpu-demo", root=args.runs, progress=False)
    model, _ = model_from_checkpoint(selected_checkpoint(trainer))
    # Calibrated on the validation split: the test split is what notebook 06 reports on.
    x, y = (t[: args.n] for t in trainer.data.val)
    cfg = trainer.cfg
    val = make_phantom_dataset(cfg.n_val, cfg.img_size, cfg.site, seed=1)  # build_data's validation split
    assert torch.equal(val.images[: args.n], x), "the validation split's masks must belong to its images"
    truth = val.lung_masks[: args.n]
    real = None
    shared = find_shared_data()
    if shared is not None:
        real = load_images(shared / "sarscov2", x.shape[-1], progress=False).images[::20][: args.n]
        real_mask = lung_mask(real, threshold="otsu")
    clean_acc = accuracy(model, x, y)
    rows = []
    print(f"ERM clean accuracy {clean_acc:.3f} (n={len(y)}, phantom site A, {x.shape[-1]} px)")
    print(f"{'corruption':16s} sev  param     acc   drop  change  dice_gt  real_change  real_dice")
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            xc = corrupt(x, name, severity, seed=0)
            row = {
                "corruption": name,
                "family": FAMILY_OF[name],
                "severity": severity,
                "parameter": SEVERITIES[name][severity - 1],
                "accuracy": accuracy(model, xc, y),
                "mean_abs_change": (xc - x).abs().mean().item(),
                "lung_dice_vs_truth": dice(lung_mask(xc, threshold="otsu"), truth).mean().item(),
            }
            row["drop"] = clean_acc - row["accuracy"]
            if real is not None:
                rc = corrupt(real, name, severity, seed=0)
                row["real_mean_abs_change"] = (rc - real).abs().mean().item()
                row["real_lung_dice_vs_clean"] = dice(lung_mask(rc, threshold="otsu"), real_mask).mean().item()
            rows.append(row)
            print(
                f"{name:16s} {severity}  {row['parameter']!s:8s} {row['accuracy']:.3f} {row['drop']:+.3f} "
                f"{row['mean_abs_change']:.3f}   {row['lung_dice_vs_truth']:.3f}   "
                f"{row.get('real_mean_abs_change', float('nan')):.3f}        "
                f"{row.get('real_lung_dice_vs_clean', float('nan')):.3f}"
            )
    write_record(
        args.out,
        {
            "benchmark": "corruptions_calibration",
            "clean_accuracy": clean_acc,
            "n": len(y),
            "size": x.shape[-1],
            "rows": rows,
            "environment": environment_info(),
        },
    )


if __name__ == "__main__":
    main()
