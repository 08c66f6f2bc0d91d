"""torchvision-architecture ResNets and the state-dict converter, against PyTorch.

torchvision itself is not installed beside the pinned torch wheel, so the reference is a
PyTorch ResNet written here from torchvision's definition (``torchvision/models/
resnet.py``: BasicBlock, Bottleneck v1.5, 7x7/2 stem with a 3x3/2 max-pool). Random
weights, random BatchNorm statistics; the converted Flax model must give the same
logits and features in eval and in train mode.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn as tnn  # noqa: E402

from kdjax import models  # noqa: E402
from kdjax.models import convert  # noqa: E402
from kdjax.models.torchvision import TorchvisionResNet  # noqa: E402


# --------------------------------------------------------------- reference (torch)
class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(tnn.Module):
    def __init__(self, block, layers, num_classes):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                tnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {"stem": x}
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
            feats[f"stage{s}"] = x
        pooled = torch.flatten(self.avgpool(x), 1)
        return self.fc(pooled), feats


SPECS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
         50: (Bottleneck, (3, 4, 6, 3))}


def torch_resnet(depth, num_classes, seed=0):
    torch.manual_seed(seed)
    block, layers = SPECS[depth]
    net = TorchResNet(block, layers, num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # non-trivial BN parameters and statistics
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net


def numpy_state_dict(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_array_less(np.abs(a - b).max(), tol * scale)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("depth", [18, pytest.param(34, marks=pytest.mark.slow),
                                   pytest.param(50, marks=pytest.mark.slow)])
def test_converted_model_equals_torch_in_eval_and_train_mode(depth):
    net = torch_resnet(depth, num_classes=7)
    variables = convert.torchvision_to_flax(numpy_state_dict(net), depth)
    flax_model = models.create(f"tv_resnet{depth}", 7)
    # odd, non-square size: stride-2 layers pad symmetrically like torch
    x = np.random.default_rng(0).normal(size=(3, 3, 67, 53)).astype(np.float32)
    xf = jnp.asarray(x.transpose(0, 2, 3, 1))

    net.eval()
    with torch.no_grad():
        ref_logits, ref_feats = net(torch.from_numpy(x))
    logits, feats = flax_model.apply(variables, xf, train=False)
    _close(logits, ref_logits.numpy())
    for k in ("stem", "stage1", "stage2", "stage3", "stage4"):
        assert feats[k].shape == _nhwc(ref_feats[k]).shape, k
        _close(feats[k], _nhwc(ref_feats[k]))

    net.train()
    with torch.no_grad():
        ref_logits, _ = net(torch.from_numpy(x))
    (logits, _), upd = flax_model.apply(variables, xf, train=True, mutable=["batch_stats"])
    _close(logits, ref_logits.numpy())
    # running statistics: the means follow torch's update exactly; torch's variance update
    # uses the unbiased batch variance, Flax's the biased one (documented deviation):
    # torch_var = 0.9 v0 + 0.1 * n/(n-1) * b  and  flax_var = 0.9 v0 + 0.1 * b.
    new_sd = numpy_state_dict(net)
    old = variables["batch_stats"]["bn1"]
    n = 3 * 34 * 27   # rows of the stem BN's batch: B * H * W after the 7x7/2 conv
    b = (upd["batch_stats"]["bn1"]["var"] - 0.9 * old["var"]) / 0.1
    _close(upd["batch_stats"]["bn1"]["mean"], new_sd["bn1.running_mean"], 1e-5)
    _close(0.9 * old["var"] + 0.1 * b * n / (n - 1), new_sd["bn1.running_var"], 1e-5)
    # and training mode really differs from eval mode here (the comparison is not vacuous)
    assert not np.allclose(logits, flax_model.apply(variables, xf, train=False)[0],
                           atol=1e-3)


def test_parameter_counts_match_torchvision():
    # torchvision's published counts (1000 classes): 11,689,512 / 21,797,672 / 25,557,032
    expect = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
    for depth, count in expect.items():
        shapes = jax.eval_shape(lambda d=depth: TorchvisionResNet(1000, d).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"]))
        assert n == count, depth


def test_safetensors_and_pth_files_load_to_the_same_variables(tmp_path):
    from safetensors.numpy import save_file

    net = torch_resnet(18, num_classes=5, seed=3)
    sd = numpy_state_dict(net)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
              str(tmp_path / "r18.safetensors"))
    a = convert.torchvision_to_flax(convert.load_state_dict(tmp_path / "r18.pth"), 18)
    b = convert.torchvision_to_flax(convert.load_state_dict(tmp_path / "r18.safetensors"), 18)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a["params"]["fc"]["kernel"], sd["fc.weight"].T)


def test_load_pretrained_puts_a_fresh_head_of_the_task_size(tmp_path):
    from safetensors.numpy import save_file

    net = torch_resnet(18, num_classes=1000, seed=4)
    sd = numpy_state_dict(net)
    path = str(tmp_path / "r18.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    module, variables = convert.load_pretrained(path, 18, 4, key=jax.random.PRNGKey(0))
    assert variables["params"]["fc"]["kernel"].shape == (512, 4)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["batch_stats"]["layer4_1"]["bn2"]["var"],
                                  sd["layer4.1.bn2.running_var"])
    logits, _ = module.apply(variables, jnp.zeros((1, 32, 32, 3)))
    assert logits.shape == (1, 4)


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    missing = os.path.join(tmp_path, "resnet50.pth")
    with pytest.raises(FileNotFoundError, match=r"resnet50-0676ba61\.pth"):
        convert.load_pretrained(missing, 50, 10, key=jax.random.PRNGKey(0))


def test_wrong_depth_or_foreign_dict_is_a_listed_error():
    sd = numpy_state_dict(torch_resnet(18, 3))
    with pytest.raises(ValueError, match=r"unmatched torch keys|left unfilled"):
        convert.torchvision_to_flax(sd, 34)
    with pytest.raises(ValueError, match=r"shape mismatches \['conv1.weight"):
        bad = dict(sd, **{"conv1.weight": np.zeros((64, 3, 3, 3), np.float32)})
        convert.torchvision_to_flax(bad, 18)
    with pytest.raises(ValueError, match="no 'fc.weight'"):
        convert.torchvision_to_flax({"w": np.zeros(3)}, 18)
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50\], got 101"):
        convert.torchvision_to_flax(sd, 101)
