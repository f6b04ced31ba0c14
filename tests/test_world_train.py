"""The world's training commands run a few steps on tiny configs and resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from world.cli import register
from world.pipeline import load_world_pipeline
from world.train_common import load_checkpoint


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="area", required=True))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_train_clip_and_unet_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip_dir = tmp_path / "clip"
    common = ["--json", "--threads", "1"]
    out = run(
        [
            "world",
            "train-clip",
            "--tiny",
            "--out",
            str(clip_dir),
            "--steps",
            "2",
            "--batch-size",
            "16",
            *common,
        ],
        capsys,
    )
    assert Path(str(out["model"])).is_dir()
    ck = load_checkpoint(clip_dir)
    assert ck is not None and ck["step"] == 2
    run(
        [
            "world",
            "train-clip",
            "--tiny",
            "--out",
            str(clip_dir),
            "--steps",
            "3",
            "--batch-size",
            "16",
            *common,
        ],
        capsys,
    )
    ck = load_checkpoint(clip_dir)
    assert ck is not None and ck["step"] == 3  # resumed, one more step

    unet_dir = tmp_path / "unet"
    uargs = [
        "world",
        "train-unet",
        "--tiny",
        "--clip",
        str(clip_dir / "clip"),
        "--out",
        str(unet_dir),
        "--batch-size",
        "4",
        *common,
    ]
    run([*uargs, "--steps", "2"], capsys)
    ck = load_checkpoint(unet_dir)
    assert ck is not None and ck["step"] == 2
    first_ema = {k: v.clone() for k, v in ck["ema"]["shadow"].items()}
    out = run([*uargs, "--steps", "3"], capsys)
    ck = load_checkpoint(unet_dir)
    assert ck is not None and ck["step"] == 3 and ck["ema"]["steps"] == 3
    assert any(not torch.equal(first_ema[k], v) for k, v in ck["ema"]["shadow"].items())

    exported = tmp_path / "exported"
    run(
        [
            "world",
            "export",
            "--ckpt",
            str(unet_dir),
            "--clip",
            str(clip_dir / "clip"),
            "--out",
            str(exported),
            *common,
        ],
        capsys,
    )
    pipe = load_world_pipeline(exported)
    img = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    also = load_world_pipeline(Path(str(out["pipeline"])))
    assert also.unet.config["in_channels"] == 5
