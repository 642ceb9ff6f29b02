"""GlobalBatchNorm and global_sum: two gloo processes, each with half of a batch, compute the gradients, BatchNorm
statistics, batch-level losses (soft Dice, masked mean) and roadwork's feature statistics of one process with the
whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from timm.layers import BatchNormAct2d

from common.cluster.sync_batchnorm import GlobalBatchNorm, convert_batchnorm, wants_sync_batchnorm
from common.training.losses import masked_mean
from roadwork.feature_stats import FeatureStats
from sclera.loss import batch_soft_dice

WORLD = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         BatchNormAct2d(4, act_layer=nn.SiLU), nn.Conv2d(4, 1, 1), nn.BatchNorm2d(1, momentum=None))


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=gen) * 3 + 1
    target = (torch.rand(8, 1, 6, 6, generator=gen) > 0.6).float()
    observed = torch.rand(8, generator=gen) > torch.linspace(0.1, 0.9, 8)     # unequal counts per half
    return x, target, observed


def _loss(logits, target, observed):
    per_image = (logits.sigmoid() - target).square().mean((1, 2, 3))
    return 1 - batch_soft_dice(logits, target, 1e-6) + masked_mean(per_image, observed)


def _train(model, x, target, observed, steps=2):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(model(x), target, observed).backward()
        optimizer.step()


def _feature_stats(x) -> FeatureStats:
    """roadwork's running feature statistics, updated with two batches (exact merge, then momentum)."""
    stats = FeatureStats(3, None)
    features = x.mean((2, 3))
    stats.update(features)
    stats.momentum = 0.3
    stats.update(features * 2 + 1)
    return stats


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = _net()
    assert convert_batchnorm(model) == 3
    x, target, observed = (t[rank::WORLD] for t in _batch())
    _train(DistributedDataParallel(model), x, target, observed)
    stats = _feature_stats(x)
    if rank == 0:
        torch.save({"model": model.state_dict(), "stats": stats.state_dict()}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_as_one_with_the_whole_batch(tmp_path):
    single = _net()
    _train(single, *_batch())
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    saved = torch.load(out, weights_only=True)
    ddp = saved["model"]
    assert set(ddp) == set(single.state_dict())                    # checkpoints interchangeable
    for key, value in single.state_dict().items():                 # weights and running statistics
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain = _net()
    x, target, observed = (t[0::WORLD] for t in _batch())
    _train(plain, x, target, observed)                             # what one rank alone would learn
    assert not torch.allclose(plain.state_dict()["1.running_var"], single.state_dict()["1.running_var"])
    one = _feature_stats(_batch()[0]).state_dict()
    torch.testing.assert_close(saved["stats"], one)
    assert not torch.allclose(_feature_stats(x).state_dict()["var"], one["var"])


def test_global_batchnorm_is_batchnorm_in_one_process():
    net, converted = _net(), _net()
    convert_batchnorm(converted)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[4].act, nn.SiLU)
    x = _batch()[0]
    torch.testing.assert_close(converted(x), net(x))
    torch.testing.assert_close(converted.state_dict(), net.state_dict())


def test_conversion_keeps_the_tensors_and_the_setting_is_checked():
    net = _net()
    weight, mean = net[1].weight, net[1].running_mean
    convert_batchnorm(net)
    assert net[1].weight is weight and net[1].running_mean is mean
    assert wants_sync_batchnorm("auto", 2) and not wants_sync_batchnorm("auto", 1)
    assert not wants_sync_batchnorm(False, 4)
    with pytest.raises(ValueError, match="trainer.sync_batchnorm='yes'"):
        wants_sync_batchnorm("yes", 2)


def test_an_unknown_batchnorm_subclass_is_refused_by_its_path():
    class ScaledNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"model\.1\.1 is a .*ScaledNorm.*trainer\.sync_batchnorm=false"):
        convert_batchnorm(nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), ScaledNorm(2))))
