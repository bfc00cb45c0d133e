"""Command line: train the Fashion-MNIST domain classifier and save it.

``python -m flowturbo.training.evaluation.classifier_cli --out DIR [--epochs N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from flowturbo.errors import FlowTurboError

from flowturbo.training.evaluation.classifier import TrainClassifierConfig, save_classifier, train_classifier
from flowturbo.training.fashion_mnist import DEFAULT_ROOT


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST domain classifier used for evaluation.")
    parser.add_argument("--out", required=True, type=Path, help="folder for classifier.safetensors + classifier.json")
    data = parser.add_argument_group("data")
    data.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST idx files")
    data.add_argument("--train-limit", type=int, default=None)
    train = parser.add_argument_group("training")
    defaults = TrainClassifierConfig()
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, report test accuracy, save."""
    args = _parse_args(argv)
    config = TrainClassifierConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_limit=args.train_limit
    )
    try:
        result = train_classifier(config, root=args.root, device=args.device)
    except FlowTurboError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_classifier(
        result.model,
        args.out,
        metadata={"train": dataclasses.asdict(config), "test_accuracy": result.test_accuracy,
                  "epoch_losses": result.epoch_losses},
    )
    print(f"test accuracy {result.test_accuracy:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
