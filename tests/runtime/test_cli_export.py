"""`flowturbo export` then `flowturbo sample --artifacts DIR --backend onnxruntime` through the CLI."""

from __future__ import annotations

import json

import torch
from tolerances import tol

from flowturbo.runtime.cli import main
from flowturbo.runtime.images import read_sample_folder
from flowturbo.training.bundle import make_random_bundle


def test_export_then_sample_onnxruntime_matches_pytorch(tmp_path, capsys):
    bundle = tmp_path / "tiny"
    make_random_bundle(bundle, preset="SiT-T/2", input_size=8, in_channels=4, num_classes=10, seed=2,
                       with_refiner=True, decoder="identity")
    art = tmp_path / "art"
    assert main(["export", "--model", str(bundle), "--schedule", "H1P2R1", "--cfg", "2.0", "--batch", "1:2:4",
                 "--format", "onnx", "--variant", "time-input", "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["schedule"]["notation"] == "H1P2R1"
    common = ["--classes", "4,0,9", "--seed", "5", "--no-progress", "--grid-scale", "1"]
    assert main(["sample", "--artifacts", str(art), "--backend", "onnxruntime", "--out", str(tmp_path / "ort"),
                 *common]) == 0
    assert main(["sample", "--model", str(bundle), "--schedule", "H1P2R1", "--cfg", "2.0", "--device", "cpu",
                 "--out", str(tmp_path / "pt"), *common]) == 0
    ort_images, ort_labels, ort_record = read_sample_folder(tmp_path / "ort")
    pt_images, pt_labels, _ = read_sample_folder(tmp_path / "pt")
    assert ort_labels == pt_labels == [4, 0, 9] and ort_record["backend"] == "onnxruntime"
    torch.testing.assert_close(ort_images, pt_images, **tol("uint8_image_as_float"))
    # A schedule other than the exported one is refused, nothing written.
    capsys.readouterr()
    assert main(["sample", "--artifacts", str(art), "--backend", "onnxruntime", "--schedule", "H3",
                 "--out", str(tmp_path / "bad"), *common]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["sample", "--backend", "onnxruntime", "--out", str(tmp_path / "bad")]) == 2
