"""Evaluation (sdcore.evaluate): rank split, seeding, uint8 conversion, FID / CLIP against independent
computations, and invariance to world size and batch size. Tiny models throughout: the golden UNet and VAE
configurations, the ``sdcore-tiny-clip`` OpenCLIP arch, a random Inception-v3 with calibrated BatchNorm."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from reference import golden
from scipy import linalg
from torchvision.transforms import ToPILImage

import sdcore.text_encoder  # noqa: F401  registers sdcore-tiny-clip
from sdcore.evaluate import (
    Evaluator,
    PromptScores,
    initial_latents,
    load_unet_checkpoint,
    rank_block,
    to_uint8_images,
)
from sdcore.prep.demo_mirror import inception_state
from sdcore.text_encoder import FrozenOpenCLIPText

REPO = Path(__file__).resolve().parents[1]
CLIP_ARCH = "sdcore-tiny-clip"
NUM_PROMPTS = 5  # odd, so two ranks get 3 and 2 prompts
PROMPTS = ["a red circle on a blue square", "two green triangles", "a cat on a sofa",
           "a yellow bus in the rain", "", "an unused sixth caption"]
DDIM_STEPS = 10  # the benchmark's 50 only cost time here; every property tested holds for any step count
# A batch of another size (or another rank's batch) runs the UNet through float32 kernels that sum in another
# order; after DDIM the decoded value of an odd pixel then lands on the other side of a uint8 step. Images may
# therefore differ by one level in a few pixels, and the metrics by the matching small amounts:
MAX_DIFFERING_PIXELS = 1e-3  # fraction of all pixel values
FEATURE_ATOL = 0.1           # pool3 features here are ~30 in magnitude
CLIP_ATOL = 1e-4
FID_RTOL = 1e-3
# The same images scored twice, or by an independent implementation, agree to float32 rounding:
EXACT_CLIP_ATOL = 1e-6
EXACT_FID_RTOL = 1e-6


def _config(root: Path) -> dict:
    unet_golden = golden("unet")
    vae_golden = golden("vae")
    return {
        "paths": {"data": str(root / "data"), "checkpoints": str(root / "checkpoints"), "results": str(root / "results")},
        "checkpoints": {"sd": {"file": "tiny.ckpt"}, "inception": {"file": "inception.pth"},
                        "clip": {"file": "clip.bin", "arch": CLIP_ARCH}},
        "model": {"params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
            "image_size": 8, "channels": 4,
            "unet_config": {"params": unet_golden["config"]},
            "first_stage_config": {"params": {"embed_dim": vae_golden["embed_dim"], "ddconfig": vae_golden["ddconfig"]}},
            "cond_stage_config": {"params": {"arch": CLIP_ARCH, "layer": "penultimate", "max_length": 77}},
        }},
        "train": {"seed": 42},
        "eval": {"num_prompts": NUM_PROMPTS, "batch_size": 2, "ddim_steps": DDIM_STEPS, "eta": 0.0, "guidance_scale": 8.0,
                 "fid_target": 90.0, "clip_target": 0.15},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, its input files and a training checkpoint, all in a temporary directory."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    config = _config(root)
    coco = root / "data" / "coco2014"
    coco.mkdir(parents=True)
    rows = [f"{1000 + i}\t{i}\t{caption}" for i, caption in enumerate(PROMPTS)]
    (coco / "val2014_30k.tsv").write_text("image_id\tid\tcaption\n" + "\n".join(rows) + "\n")
    generator = np.random.default_rng(0)
    np.savez(coco / "val2014_512x512_30k_stats.npz", mu=generator.normal(30.0, 10.0, 2048),
             sigma=np.diag(generator.uniform(50.0, 150.0, 2048)))

    for part in ("sd", "inception", "clip"):
        (root / "checkpoints" / part).mkdir(parents=True)
    torch.manual_seed(0)
    text_encoder = FrozenOpenCLIPText(CLIP_ARCH)
    vae_state = golden("vae")["state_dict"]
    sd_state = {f"first_stage_model.{k}": v for k, v in vae_state.items()}
    sd_state.update({f"cond_stage_model.{k}": v for k, v in text_encoder.state_dict().items()})
    torch.save({"state_dict": sd_state}, root / "checkpoints" / "sd" / "tiny.ckpt")
    torch.save(open_clip.create_model(CLIP_ARCH).state_dict(), root / "checkpoints" / "clip" / "clip.bin")
    calibration = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    torch.save(inception_state(calibration, seed=0), root / "checkpoints" / "inception" / "inception.pth")

    unet_state = golden("unet")["state_dict"]
    checkpoint = root / "step_00000003.pt"
    torch.save({"unet": unet_state, "step": 3, "samples_seen": 24}, checkpoint)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": config, "config_path": config_path, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def evaluator(setup):
    return Evaluator(setup["config"], "cpu")


@pytest.fixture(scope="module")
def unet(setup):
    return load_unet_checkpoint(setup["config"], setup["checkpoint"], "cpu")[0]


@pytest.fixture(scope="module")
def single_rank_scores(evaluator, unet):
    """Per-prompt scores of one rank with the configured batch size (2)."""
    return evaluator.score_prompts(unet, range(NUM_PROMPTS))


@pytest.fixture(scope="module")
def single_rank_result(evaluator, unet):
    """The full result of one rank. Slow: scipy's 2048x2048 matrix square root takes minutes on this CPU."""
    return evaluator.evaluate(unet, samples_seen=24)


def test_rank_blocks_cover_every_prompt_once():
    for num_items in (1, 5, 7, 30000):
        for world_size in (1, 2, 3, 8):
            blocks = [rank_block(num_items, rank, world_size) for rank in range(world_size)]
            assert [i for block in blocks for i in block] == list(range(num_items))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_initial_latents_depend_only_on_prompt_index_and_seed():
    whole = initial_latents(range(5), (4, 8, 8), seed=42)
    split = torch.cat([initial_latents([0, 1], (4, 8, 8), seed=42), initial_latents([2, 3, 4], (4, 8, 8), seed=42)])
    assert torch.equal(whole, split)
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole, initial_latents(range(5), (4, 8, 8), seed=43))


def test_uint8_images_truncate_like_the_references_to_pil_image():
    decoded = torch.linspace(-1.2, 1.2, 3 * 16 * 16).reshape(1, 3, 16, 16)
    ours = to_uint8_images(decoded)[0].permute(1, 2, 0).numpy()
    reference = np.asarray(ToPILImage()(torch.clamp((decoded[0] + 1.0) / 2.0, min=0.0, max=1.0)))
    np.testing.assert_array_equal(ours, reference)


def test_scores_cover_every_prompt_and_vary(single_rank_scores):
    scores = single_rank_scores
    assert torch.equal(scores.indices, torch.arange(NUM_PROMPTS))
    assert scores.inception.shape == (NUM_PROMPTS, 2048) and scores.clip.shape == (NUM_PROMPTS,)
    assert ((-1.0 <= scores.clip) & (scores.clip <= 1.0)).all()
    assert scores.inception.std(dim=0).max() > 1.0, "features must vary between images for FID to mean anything"


def assert_nearly_equal_images(images: torch.Tensor, expected: torch.Tensor) -> None:
    difference = (images.int() - expected.int()).abs()
    assert difference.max() <= 1
    assert difference.count_nonzero() <= MAX_DIFFERING_PIXELS * difference.numel()


def assert_nearly_equal_scores(scores: PromptScores, expected: PromptScores) -> None:
    assert torch.equal(scores.indices, expected.indices)
    torch.testing.assert_close(scores.inception, expected.inception, rtol=0, atol=FEATURE_ATOL)
    torch.testing.assert_close(scores.clip, expected.clip, rtol=0, atol=CLIP_ATOL)


def test_results_do_not_depend_on_batch_size(evaluator, unet, single_rank_scores):
    """FID and CLIP are functions of these per-prompt features and scores (and of their order, fixed by index)."""
    whole_batch = evaluator.generate(unet, list(range(NUM_PROMPTS)))
    one_by_one = torch.cat([evaluator.generate(unet, [i]) for i in range(NUM_PROMPTS)])
    assert_nearly_equal_images(one_by_one, whole_batch)
    assert_nearly_equal_scores(evaluator.score_prompts(unet, range(NUM_PROMPTS), batch_size=1), single_rank_scores)


def test_clip_score_equals_open_clip_computed_independently(setup, evaluator, unet, single_rank_scores):
    scores = single_rank_scores
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_ARCH)
    model.load_state_dict(torch.load(setup["root"] / "checkpoints" / "clip" / "clip.bin", weights_only=True))
    model.eval()
    indices = [0, 3]
    images = evaluator.generate(unet, indices)
    with torch.no_grad():
        for image, index in zip(images, indices):
            pixels = preprocess(ToPILImage()(image)).unsqueeze(0)
            image_features = model.encode_image(pixels).float()
            text_features = model.encode_text(open_clip.tokenize([PROMPTS[index]])).float()
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)
            expected = (image_features @ text_features.T).item()
            assert scores.clip[index].item() == pytest.approx(expected, abs=EXACT_CLIP_ATOL)


def _fid_by_eigenvalues(features: np.ndarray, mu2: np.ndarray, sigma2_diagonal: np.ndarray) -> float:
    """Independent FID: Tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of the symmetric sqrt(S2) S1 sqrt(S2)."""
    mu1, sigma1 = features.mean(axis=0), np.cov(features, rowvar=False)
    root2 = np.sqrt(sigma2_diagonal)
    eigenvalues = linalg.eigvalsh(root2[:, None] * sigma1 * root2[None, :])
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + sigma2_diagonal.sum() - 2 * trace_sqrt)


@pytest.mark.slow
def test_result_is_the_mean_clip_and_a_finite_fid(single_rank_scores, single_rank_result):
    result = single_rank_result
    assert result["num_prompts"] == NUM_PROMPTS and result["samples_seen"] == 24 and result["seconds"] > 0
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["clip"] == pytest.approx(float(single_rank_scores.clip.mean()), abs=1e-12)


@pytest.mark.slow
def test_fid_equals_frechet_distance_of_torch_fidelity_features(setup, evaluator, unet, single_rank_result):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    result = single_rank_result
    images = evaluator.generate(unet, list(range(NUM_PROMPTS)))
    extractor = FeatureExtractorInceptionV3(  # our own file from the fixture: safe to unpickle
        "inception-v3-compat", ["2048"],
        feature_extractor_weights_path=str(setup["root"] / "checkpoints" / "inception" / "inception.pth"))
    with torch.no_grad():
        (features,) = extractor(images)
    with np.load(setup["root"] / "data" / "coco2014" / "val2014_512x512_30k_stats.npz") as stats:
        expected = _fid_by_eigenvalues(features.double().numpy(), stats["mu"], np.diagonal(stats["sigma"]))
    assert result["fid"] == pytest.approx(expected, rel=EXACT_FID_RTOL)


def _two_rank_worker(rank: int, config: dict, checkpoint: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = Evaluator(config, "cpu", rank=rank, world_size=2)
        unet = load_unet_checkpoint(config, checkpoint, "cpu")[0]
        local = evaluator.score_prompts(unet, evaluator.my_indices)
        gathered = local.gather(2, torch.device("cpu"))
        result = evaluator.evaluate(unet, samples_seen=24)
        torch.save({"local_indices": local.indices, "gathered": vars(gathered), "result": result},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_each_prompt_once_and_match_one_rank(setup, single_rank_scores, single_rank_result,
                                                            tmp_path):
    scores, result = single_rank_scores, single_rank_result
    mp.spawn(_two_rank_worker, nprocs=2, join=True,
             args=(setup["config"], str(setup["checkpoint"]), str(tmp_path / "init"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    local = [r["local_indices"].tolist() for r in ranks]
    assert sorted(local[0] + local[1]) == list(range(NUM_PROMPTS)) and not set(local[0]) & set(local[1])
    assert {len(local[0]), len(local[1])} == {2, 3}
    for r in ranks:
        assert_nearly_equal_scores(PromptScores(**r["gathered"]), scores)
        assert r["result"]["num_prompts"] == NUM_PROMPTS
        assert r["result"]["fid"] == pytest.approx(result["fid"], rel=FID_RTOL)
        assert r["result"]["clip"] == pytest.approx(result["clip"], abs=CLIP_ATOL)


@pytest.mark.slow
def test_offline_cli_writes_the_result_json(setup, single_rank_result, tmp_path):
    result = single_rank_result
    out = tmp_path / "eval" / "step_00000003.json"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "evaluate.py"), "--config", str(setup["config_path"]),
                    "--checkpoint", str(setup["checkpoint"]), "--out", str(out), "--device", "cpu"],
                   check=True, env=env, cwd=setup["root"])
    written = json.loads(out.read_text())
    assert written["checkpoint"] == str(setup["checkpoint"])
    assert (written["step"], written["samples_seen"], written["num_prompts"]) == (3, 24, NUM_PROMPTS)
    assert written["fid"] == pytest.approx(result["fid"], rel=EXACT_FID_RTOL)
    assert written["clip"] == pytest.approx(result["clip"], abs=EXACT_CLIP_ATOL)
    assert written["targets_met"] == (written["fid"] <= 90.0 and written["clip"] >= 0.15)
    assert list(out.parent.iterdir()) == [out], "no temporary file may be left behind"
