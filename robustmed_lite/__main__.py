"""Command line: ``python -m robustmed_lite <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from .evaluate import accuracy
    from .models import create_model
    from .phantom import make_phantom_dataset
    from .runinfo import seed_everything
    from .trainer import fit_erm

    seed_everything(args.seed)
    start = time.time()
    print(f"generating the phantom: {args.n_train} training slices at {args.size} px (site A) ...")
    train = make_phantom_dataset(args.n_train, args.size, site="A", seed=args.seed)
    test_a = make_phantom_dataset(600, args.size, site="A", seed=args.seed + 1)
    test_b = make_phantom_dataset(600, args.size, site="B", seed=args.seed + 1)
    model = create_model(args.model, img_size=args.size)
    fit_erm(model, train.images, train.labels, epochs=args.epochs, seed=args.seed)
    acc_a = accuracy(model, test_a.images, test_a.labels)
    acc_b = accuracy(model, test_b.images, test_b.labels)
    print(f"\n{args.model}, ERM, {args.epochs} epochs, seed {args.seed}, {time.time() - start:.0f} s")
    print(f"  accuracy, held-out site A (n=600): {acc_a:.3f}")
    print(f"  accuracy, site B, another scanner (n=600): {acc_b:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="robustmed_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: train on the phantom and report accuracy (CPU, minutes)")
    demo.add_argument("--model", default="small_cnn")
    demo.add_argument("--size", type=int, default=64)
    demo.add_argument("--n-train", type=int, default=2000)
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
