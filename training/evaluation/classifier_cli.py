"""Command line: train the Fashion-MNIST domain classifier and save it.

``python -m flowturbo.training.evaluation.classifier_cli --out DIR [--epochs N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flowturbo.cliargs import POSITIVE, POSITIVE_INT, SEED, ArgumentParser, input_path, output_path, run_command

from flowturbo.training.evaluation.classifier import TrainClassifierConfig, save_classifier, train_classifier
from flowturbo.training.fashion_mnist import DEFAULT_ROOT


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m flowturbo.training.evaluation.classifier_cli",
                            description="Train the Fashion-MNIST domain classifier used for evaluation.")
    parser.add_argument("--out", required=True, type=output_path("--out"),
                        help="folder for classifier.safetensors + classifier.json")
    data = parser.add_argument_group("data")
    data.add_argument("--root", type=input_path("--root"), default=str(DEFAULT_ROOT),
                      help="folder with the Fashion-MNIST idx files")
    data.add_argument("--train-limit", type=POSITIVE_INT, default=None)
    train = parser.add_argument_group("training")
    defaults = TrainClassifierConfig()
    train.add_argument("--epochs", type=POSITIVE_INT, default=defaults.epochs)
    train.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size)
    train.add_argument("--lr", type=POSITIVE, default=defaults.lr)
    train.add_argument("--seed", type=SEED, default=defaults.seed)
    train.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.set_defaults(handler=_train, command="classifier")
    return parser


def _train(args: argparse.Namespace) -> int:
    """Check --out, train, report test accuracy, save."""
    from flowturbo.fileio import check_writable_target

    check_writable_target(args.out)  # before the training, not after it
    config = TrainClassifierConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_limit=args.train_limit
    )
    result = train_classifier(config, root=args.root, device=args.device)
    save_classifier(
        result.model,
        args.out,
        metadata={"train": dataclasses.asdict(config), "test_accuracy": result.test_accuracy,
                  "epoch_losses": result.epoch_losses},
    )
    print(f"test accuracy {result.test_accuracy:.4f}; saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train, report test accuracy, save; a foreseeable mistake is one ``error:`` line and status 2."""
    return run_command(_parser(), list(sys.argv[1:] if argv is None else argv), lambda args: "classifier")

if __name__ == "__main__":
    raise SystemExit(main())
