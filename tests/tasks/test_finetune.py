"""The fine-tuning seam: a toy dense task trained by the pretraining engine (resume, model file, validation)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from foundation.cli import main
from foundation.data.seeding import generator_for
from foundation.errors import CheckpointError
from foundation.tasks import TaskParts, register_task
from foundation.tasks.base import add_config_flag
from foundation.tasks.checkpoint import load_net_weights, load_task_checkpoint
from foundation.train import checkpoint as ckpt

RECIPE = """\
domain: images
model: {arch: vit_tiny, patch_size: 8, img_size: 32}
optim: {lr: 0.001, lr_scaling: none, warmup_steps: 2, weight_decay: 0.0, weight_decay_end: 0.0, layer_decay: 0.75}
train: {steps: 6, batch_size: 4, checkpoint_every: 3, log_every: 1, eval_every: 3}
data: {num_workers: 0}
task: {options: {target: 0.5}}
"""


class BrightnessDataset(torch.utils.data.Dataset):
    """image i: random noise; target: its per-pixel brightness (a dense regression target)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __getitem__(self, index: int):
        g = generator_for(self.seed, index)
        image = torch.rand(3, 32, 32, generator=g)
        return {"image": image, "target": image.mean(0, keepdim=True)}

    def __len__(self) -> int:
        return 2**62


class DenseNet(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.embed_dim, 1, 1)

    def forward(self, x):
        tokens = self.backbone.forward_dict(x)["patch"]
        b, n, d = tokens.shape
        side = int(n**0.5)
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        return nn.functional.interpolate(self.head(grid), size=x.shape[-2:], mode="bilinear")


def _loss(pred, batch):
    loss = nn.functional.mse_loss(pred, batch["target"])
    return {"loss": loss, "mse": loss.detach()}


@dataclass(frozen=True)
class ToyOptions:
    target: float = 0.0


@dataclass(frozen=True)
class ToyInputs:
    flavour: str = "plain"


@register_task("toy-brightness")
class ToyTask:
    name = "toy-brightness"
    domain = "images"
    default_config = Path("unused.yaml")
    options_type = ToyOptions
    inputs_type = ToyInputs
    validations: list = []

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_flag(parser, "--flavour", "task.inputs.flavour")

    def data_channels(self, cfg):
        return None

    def build(self, cfg, backbone, backbone_meta):
        assert cfg.task.typed_inputs.flavour == "salty"

        def validate(net, device):
            ToyTask.validations.append(net.training)
            batch = torch.utils.data.default_collate([BrightnessDataset(99)[i] for i in range(4)])
            return {"mse": float(_loss(net(batch["image"].to(device)), batch)["loss"])}

        return TaskParts(
            net=DenseNet(backbone),
            loss=_loss,
            dataset=BrightnessDataset(cfg.seed),
            validate=validate,
            meta={"target": cfg.task.typed_options.target, "bands": [1, 2, 3]},
        )

    def add_evaluate_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True)

    def evaluate(self, args):
        return {"step": load_task_checkpoint(args.checkpoint, "toy-brightness").step}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(RECIPE)
    return path


def _finetune(recipe, out, *extra):
    argv = ["finetune", "toy-brightness", "--random-init", "--config", str(recipe), "--out", str(out)]
    return main([*argv, "--flavour", "salty", "--quiet", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_trains_validates_and_writes_a_model(recipe, tmp_path, capsys, single_thread):
    ToyTask.validations.clear()
    assert _finetune(recipe, tmp_path / "run") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == str(tmp_path / "run" / "model.pt")
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if "val/mse" in r] == [2, 5]  # eval_every=3 and the last step
    assert ToyTask.validations == [False, False]  # validation runs in eval mode
    assert all("mse" in r for r in records if "loss" in r)

    model = load_task_checkpoint(tmp_path / "run", "toy-brightness")
    assert model.task_meta == {"target": 0.5, "bands": [1, 2, 3]}
    assert model.step == 6
    # the weights rebuild the network exactly as training left it
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    from foundation.models.vit import build_vit

    net = load_net_weights(DenseNet(build_vit(**model.backbone_args)), model)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["model"][f"net.{key}"])
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    # task evaluate is dispatched to the task
    assert main(["evaluate", "toy-brightness", "--checkpoint", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.strip())["step"] == 6


def test_finetune_resumes_exactly(recipe, tmp_path, single_thread):
    assert _finetune(recipe, tmp_path / "full") == 0
    assert _finetune(recipe, tmp_path / "half", "train.steps=3") == 0
    (tmp_path / "half" / "model.pt").unlink()
    assert _finetune(recipe, tmp_path / "half") == 0  # resumes at step 3 with the same schedule
    full = {r["step"]: r["loss"] for r in _records(tmp_path / "full") if "loss" in r}
    half = {r["step"]: r["loss"] for r in _records(tmp_path / "half") if "loss" in r}
    assert half == pytest.approx(full, rel=1e-5)


def test_frozen_backbone_only_trains_the_head(recipe, tmp_path, single_thread):
    assert _finetune(recipe, tmp_path / "run", "task.freeze_backbone=true", "train.steps=2") == 0
    model = load_task_checkpoint(tmp_path / "run" / "model.pt")
    torch.manual_seed(0)
    from foundation.models.vit import build_vit

    fresh = build_vit(**model.backbone_args).state_dict()  # --random-init uses the config seed 0
    for key, value in fresh.items():
        assert torch.equal(model.net_state[f"backbone.{key}"], value), key
    assert not torch.equal(
        model.net_state["head.weight"], DenseNet(build_vit(**model.backbone_args)).head.weight
    )


def test_task_checkpoint_errors_name_the_problem(tmp_path, image_folder, tiny_recipe, single_thread):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_task_checkpoint(tmp_path / "missing.pt")
    run = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(tiny_recipe),
                "--data",
                str(image_folder),
                "--out",
                str(run),
                "--quiet",
                "train.steps=1",
            ]
        )
        == 0
    )
    with pytest.raises(CheckpointError, match="not a fine-tuned task model"):
        load_task_checkpoint(run)


def test_finetune_needs_a_backbone(recipe, tmp_path, capsys):
    argv = ["finetune", "toy-brightness", "--config", str(recipe), "--out", str(tmp_path / "run")]
    assert main([*argv, "--flavour", "salty"]) == 1
    assert "--backbone" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_saved_config_reruns_the_run_alone(recipe, tmp_path, monkeypatch, single_thread):
    """RUN/config.yaml holds the task's inputs and backbone choice: `finetune TASK --config RUN/config.yaml`
    (no flags, another working directory) trains the same weights."""
    assert _finetune(recipe, tmp_path / "first", "train.steps=2") == 0
    saved = (tmp_path / "first" / "config.yaml").read_text()
    assert "flavour: salty" in saved and "random_init: true" in saved and "typed_" not in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["finetune", "toy-brightness", "--config", str(tmp_path / "first" / "config.yaml")]
    assert main([*argv, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first, again = (load_task_checkpoint(tmp_path / run).net_state for run in ("first", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_task_options_and_inputs_are_typed_at_load(recipe, tmp_path, capsys):
    argv = [
        "finetune",
        "toy-brightness",
        "--random-init",
        "--config",
        str(recipe),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*argv, "task.options.targt=1"]) == 1
    assert "task.options.targt is not an option of toy-brightness" in capsys.readouterr().err
    assert main([*argv, "task.options.target=[1]"]) == 1
    assert "task.options.target=[1] must be float" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
