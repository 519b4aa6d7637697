"""The sampling command (``python -m sdcore.sample``), run as a user runs it: its help, the images and the grid it
writes from a training checkpoint, and one-line errors (exit code 2) for wrong arguments."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prep_helpers import golden_unet_state, tiny_model_params, tiny_sd_checkpoint
from sdcore.checkpoint import save_unet
from sdcore.evaluate import (GRID_CAPTION_HEIGHT, GRID_CELL, GRID_TITLE_HEIGHT, ImageGenerator, initial_latents,
                             load_unet_checkpoint, to_uint8_images)
from sdcore.files import is_temporary
from sdcore.sample import build_parser

torch.set_num_threads(1)

PROMPTS = ["a red circle on the left", "two blue squares"]
FILE_PROMPTS = ["a green triangle at the top"]  # from --prompts-file, after the --prompt ones
STEPS = 4  # timesteps 1, 251, 501, 751
SEED = 5
BATCH_SIZE = 2  # three prompts: batches of 2 and 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as training leaves it (checkpoints/step_00000003.safetensors, eval_config.yaml) and a
    tiny SD checkpoint with the frozen VAE and text encoder."""
    root = tmp_path_factory.mktemp("sample")
    run_dir = root / "results" / "demo"
    config = {"model": {"params": tiny_model_params()}, "eval": {"ddim_steps": 50, "guidance_scale": 8.0}}
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "eval_config.yaml").write_text(yaml.safe_dump(config))
    save_unet(run_dir / "checkpoints" / "step_00000003.safetensors", golden_unet_state(),
              {"step": 3, "samples_seen": 24, "seed": 42, "global_batch": 8})
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(FILE_PROMPTS) + "\n\n   \n")  # blank lines are skipped
    return {"root": root, "run_dir": run_dir, "config": config, "prompts_file": prompts_file,
            "sd": tiny_sd_checkpoint(root / "checkpoints" / "512-base-ema.ckpt")}


def sample(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sdcore.sample", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_help_lists_every_option():
    process = sample("--help")
    assert process.returncode == 0, process.stderr
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert {"--checkpoint", "--run-dir", "--step", "--config", "--sd-checkpoint", "--prompt", "--prompts-file",
            "--steps", "--guidance-scale", "--seed", "--batch-size", "--precision", "--device", "--out"} <= options
    for option in options:
        assert option in process.stdout, option
    assert "grid.png" in process.stdout  # the description says what is written


def expected_images(run, prompts) -> torch.Tensor:
    """The evaluation's sampler in this process, batched as the command batches: uint8 (N, 3, 64, 64)."""
    config = run["config"]
    unet, _ = load_unet_checkpoint(config, run["run_dir"] / "checkpoints" / "step_00000003.safetensors", "cpu")
    generator = ImageGenerator(config["model"]["params"], run["sd"], "cpu", "fp32", STEPS, 0.0, 8.0)
    batches = [list(range(i, min(i + BATCH_SIZE, len(prompts)))) for i in range(0, len(prompts), BATCH_SIZE)]
    return torch.cat([to_uint8_images(generator.generate(unet, [prompts[i] for i in batch],
                                                         initial_latents(batch, generator.latent_shape, SEED)))
                      for batch in batches])


def assert_nearly_equal(image: np.ndarray, expected: np.ndarray) -> None:
    """The same computation in another process: equal but for a uint8 step in a rare pixel (tests/test_evaluate)."""
    difference = np.abs(image.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 1e-3 * difference.size


@pytest.mark.slow
def test_writes_one_png_per_prompt_and_a_captioned_grid(run, tmp_path):
    out = tmp_path / "samples"
    process = sample("--run-dir", run["run_dir"], "--step", 3, "--sd-checkpoint", run["sd"],
                     *[arg for prompt in PROMPTS for arg in ("--prompt", prompt)],
                     "--prompts-file", run["prompts_file"],
                     "--steps", STEPS, "--seed", SEED, "--batch-size", BATCH_SIZE, "--device", "cpu", "--out", out)
    assert process.returncode == 0, process.stderr
    prompts = PROMPTS + FILE_PROMPTS
    names = [f"{i:04d}.png" for i in range(len(prompts))] + ["grid.png"]
    assert process.stdout.split() == [str(out / name) for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert not any(is_temporary(p.name) for p in out.iterdir())

    expected = expected_images(run, prompts)
    pictures = []
    for i in range(len(prompts)):
        with Image.open(out / f"{i:04d}.png") as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
            pictures.append(np.asarray(image))
        assert_nearly_equal(pictures[-1], expected[i].permute(1, 2, 0).numpy())
    assert not np.array_equal(pictures[0], pictures[1])

    with Image.open(out / "grid.png") as image:  # 3 prompts: one row of 3 cells
        assert image.size == (3 * GRID_CELL, GRID_TITLE_HEIGHT + GRID_CELL + GRID_CAPTION_HEIGHT)
        grid = np.asarray(image)
    for i, picture in enumerate(pictures):
        cell = grid[GRID_TITLE_HEIGHT:GRID_TITLE_HEIGHT + GRID_CELL, i * GRID_CELL:(i + 1) * GRID_CELL]
        resized = Image.fromarray(picture).resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(cell, np.asarray(resized))
        caption = grid[GRID_TITLE_HEIGHT + GRID_CELL:, i * GRID_CELL:(i + 1) * GRID_CELL]
        assert (caption.min(axis=-1) < 128).any(), f"caption {i}"
    assert (grid[:GRID_TITLE_HEIGHT].min(axis=-1) < 128).any(), "title"


@pytest.mark.slow
def test_a_png_out_writes_only_the_grid(run, tmp_path):
    """--checkpoint and --config instead of --run-dir; --out grid.png: nothing else is written."""
    out = tmp_path / "only" / "grid_seed_9.png"
    process = sample("--checkpoint", run["run_dir"] / "checkpoints" / "step_00000003.safetensors",
                     "--config", run["run_dir"] / "eval_config.yaml", "--sd-checkpoint", run["sd"],
                     "--prompt", PROMPTS[0], "--steps", 2, "--seed", 9, "--device", "cpu", "--out", out)
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == [str(out)]
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    with Image.open(out) as image:
        assert image.size == (GRID_CELL, GRID_TITLE_HEIGHT + GRID_CELL + GRID_CAPTION_HEIGHT)


def usage_cases(run, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    truncated = tmp_path / "step_00000009.safetensors"
    truncated.write_bytes((run["run_dir"] / "checkpoints" / "step_00000003.safetensors").read_bytes()[:5000])
    base = ["--sd-checkpoint", run["sd"], "--device", "cpu", "--out", tmp_path / "out"]
    on_run = ["--run-dir", run["run_dir"], "--step", 3]
    return {
        "missing checkpoint": (["--run-dir", run["run_dir"], "--step", 4, "--prompt", "x", *base],
                               "no checkpoint .*step_00000004.safetensors"),
        "empty prompt file": ([*on_run, "--prompts-file", tmp_path / "empty.txt", *base], "empty.txt: no prompts"),
        "empty prompt file beside --prompt": ([*on_run, "--prompt", "x", "--prompts-file", tmp_path / "empty.txt",
                                               *base], "empty.txt: no prompts"),
        "guidance below 1": ([*on_run, "--prompt", "x", "--guidance-scale", 0.5, *base],
                             "--guidance-scale must be >= 1"),
        "truncated checkpoint": (["--checkpoint", truncated, "--config", run["run_dir"] / "eval_config.yaml",
                                  "--prompt", "x", *base], "step_00000009.safetensors: truncated or corrupt"),
        "config without a model": ([*on_run, "--config", run["prompts_file"], "--prompt", "x", *base],
                                   "prompts.txt: no model.params"),
        "steps the schedule cannot take": ([*on_run, "--prompt", "x", "--steps", 3, *base],
                                           "--steps: 3 DDIM steps: .* gives 4 timesteps up to 1000"),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "empty prompt file", "empty prompt file beside --prompt",
                                  "guidance below 1", "truncated checkpoint", "config without a model",
                                  "steps the schedule cannot take"])
def test_wrong_arguments_fail_with_one_line_and_exit_code_2(run, tmp_path, case):
    args, message = usage_cases(run, tmp_path)[case]
    process = sample(*args)
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2
    assert len(lines) == 1 and "Traceback" not in process.stderr, process.stderr
    assert lines[0].startswith("sdcore.sample: error: ") and re.search(message, lines[0]), lines[0]
    assert process.stdout == "" and not (tmp_path / "out").exists()
