"""Two inference / training performance switches with safe defaults: trainer.merge_adapters (LoRA / DoRA folded
into the base weights at eval / predict; for DoRA the cached m * (W + BA) / ||W + BA||) and trainer.channels_last
(convolution weights, and so the decoders' activations, in NHWC memory format)."""
import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer
from torch import nn

from biomass.heads import ViTDetHead
from biomass.heads_dense import DPTHead, FPNHead
from common.cluster.distributed import DistContext
from common.models.adapters import inject_adapters, merge_adapters
from common.models.backbone import create_backbone
from common.tracking.tracker import Tracker
from common.training import adapt
from common.training.device import resolve_channels_last, to_channels_last
from common.training.trainer import Trainer
from tests.cli import TOY, run_cli
from tests.test_biomass_model import _model as biomass_model
from tests.test_sclera_model import build as sclera_model
from tests.tolerance import assert_close_reordered

ROOT = Path(__file__).resolve().parents[1]
HEAD_ADAPT = dict(modules=["head"], layers=None, train_modules=[], r=4, alpha=8, dropout=0.0)


class Regressor(nn.Module):
    """Tiny backbone + a two-linear head: adapters in both places, as with peft + adapt."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(backbone.embed_dim, 16), nn.GELU(), nn.Linear(16, 3))

    def forward(self, images):
        return self.head(self.backbone(images).tokens[-1].mean(1))


def _regressor(method: str | None) -> Regressor:
    cfg = OmegaConf.load(ROOT / "conf/backbone/tiny.yaml")
    torch.manual_seed(0)
    model = Regressor(create_backbone(**OmegaConf.to_container(cfg)))
    for name, p in model.backbone.named_parameters():          # DINO's 1e-5 layer scales would hide the adapters
        if name.endswith(".gamma"):
            p.data.fill_(1.0)
    if method is not None:
        inject_adapters(model.backbone, method, r=4, alpha=8, dropout=0.0, targets=["qkv", "mlp"], last_n_blocks=2)
        adapt.apply_head_adapters(model, OmegaConf.create({**HEAD_ADAPT, "method": method}))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_folds_backbone_and_head_adapters_without_changing_outputs(method):
    model, plain = _regressor(method), _regressor(None)
    images = torch.rand(3, 3, 28, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(images)
        assert (before - plain(images)).abs().max() > 1e-2            # the random adapters do change the output
        merged = merge_adapters(model)
        after = model(images)
    assert merged == 2 * 3 + 2                                        # qkv, fc1, fc2 of 2 blocks + 2 head linears
    assert_close_reordered(after, before, images.numel())      # W + BA summed once instead of per forward
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not any("peft_config" in vars(m) for m in model.modules())
    assert set(model.state_dict()) == set(plain.state_dict())        # the base architecture, nothing wrapped


def test_channels_last_default_resolves_per_device_and_rejects_bad_values():
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        default = compose("config", overrides=["task=sclera"]).trainer.channels_last
        gpu = compose("config", overrides=["task=sclera", "trainer=gpu"]).trainer
    assert resolve_channels_last(default, torch.device("cpu")) is False
    assert resolve_channels_last(default, torch.device("cuda")) is True
    assert gpu.channels_last is True and gpu.merge_adapters is True
    with pytest.raises(ValueError, match="trainer.channels_last='yes'"):
        resolve_channels_last("yes", torch.device("cpu"))


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def _same_outputs_in_channels_last(model, batch, key):
    """Forward and backward before / after conversion; returns the layouts of the conv outputs afterwards."""
    def run():
        model.zero_grad()
        out = model(batch)[key]
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run()
    to_channels_last(model)
    layouts = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: layouts.append(o.is_contiguous(
        memory_format=torch.channels_last))) for m in _convs(model) if m.out_channels > 1]
    out_cl, grads_cl = run()
    for h in hooks:
        h.remove()
    n = batch["image"].numel()          # bounds the longest reduction (a conv weight gradient sums B*H*W terms)
    assert_close_reordered(out_cl, out, n)
    for name, grad in grads.items():
        assert_close_reordered(grads_cl[name], grad, n)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in _convs(model))
    return layouts


@pytest.mark.parametrize("head", [
    functools.partial(ViTDetHead, width=8, hidden=8, dropout=0.0),
    functools.partial(FPNHead, width=8, hidden=8, dropout=0.0, scales=[2.0, 0.5]),
    functools.partial(DPTHead, width=8, hidden=8, dropout=0.0, scales=[4.0, 1.0]),
])
def test_biomass_conv_decoders_give_the_same_outputs_in_channels_last(head):
    torch.manual_seed(0)
    model = biomass_model(head=head).eval()
    layouts = _same_outputs_in_channels_last(model, {"image": torch.rand(2, 3, 28, 56)}, "pred_g")
    assert layouts and all(layouts)                                  # the activations follow the weights


def test_sclera_setup_converts_in_channels_last_and_keeps_outputs(tmp_path):
    model = sclera_model(kind="none").eval()
    layouts = _same_outputs_in_channels_last(model, {"image": torch.rand(2, 3, 112, 112)}, "logits")
    assert layouts and all(layouts)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["task=sclera", "trainer.device=cpu", "trainer.progress=off"])
    fresh = sclera_model(kind="none")
    Trainer(cfg, tmp_path, Tracker(), DistContext()).prepare(fresh, nn.Identity(), steps_per_epoch=1)
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last) for m in _convs(fresh)
                   if m.kernel_size != (1, 1))                       # auto on the CPU: left as it is
    cfg.trainer.channels_last = True
    Trainer(cfg, tmp_path, Tracker(), DistContext()).prepare(fresh, nn.Identity(), steps_per_epoch=1)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in _convs(fresh))


@pytest.mark.slow
def test_eval_with_merged_adapters_gives_the_same_metrics(tmp_path):
    cache, train = tmp_path / "cache", tmp_path / "train"
    adapted = ["peft=dora", "peft.lr=1e-2", "peft.dropout=0.0", "adapt.modules=[head]", "adapt.method=lora"]
    run_cli([*TOY, "trainer=debug", *adapted], train, cache)
    ckpt = train / "checkpoints" / "best.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert any("head.1.lora_B" in k and v.abs().sum() > 0 for k, v in state.items())     # trained, non-zero
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["peft_adapter"] == "best_adapter"
    assert (train / "checkpoints" / "best_adapter" / "adapter_config.json").is_file()      # peft's format beside it
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    wrapped = run_cli([*TOY, "mode=eval", f"ckpt_path={ckpt}", "trainer.merge_adapters=false"], tmp_path / "a", cache)
    merged = run_cli([*TOY, "mode=eval", f"ckpt_path={ckpt}", "trainer.merge_adapters=true",
                      "trainer.channels_last=true"], tmp_path / "b", cache)
    assert "merged the adapters" not in wrapped.stdout
    assert "merged the adapters of 5 layers" in merged.stdout                 # qkv of 4 blocks + the head linear
    values = [json.loads((tmp_path / run / "metrics.json").read_text())["eval/neg_mse"] for run in ("a", "b")]
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest           # the merged model is not saved back
