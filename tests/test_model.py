"""The seed's CNN, its switches, and the batched augmentation."""

from __future__ import annotations

import torch
from torch import nn

from mnist_study.training.augment import apply_affine, draw_affine
from mnist_study.training.config import TrainConfig
from mnist_study.training.model import SeedCNN, count_parameters
from mnist_study.training.train import build_model


def kinds(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if not isinstance(m, nn.Sequential | SeedCNN)]


def test_baseline_is_the_seed_cnn():
    model = build_model(TrainConfig())
    assert count_parameters(model) == 421_642
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    assert [(f.in_features, f.out_features) for f in linears] == [(3136, 128), (128, 10)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_pool_before_relu_equals_the_seeds_order():
    torch.manual_seed(0)
    ours = SeedCNN()
    conv1, conv2 = ours.features[0][0], ours.features[1][0]
    fc1, fc2 = ours.classifier[1], ours.classifier[4]
    seed_order = nn.Sequential(
        conv1,
        nn.ReLU(),
        nn.MaxPool2d(2),
        conv2,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        fc1,
        nn.ReLU(),
        fc2,
    )
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(ours(x), seed_order(x))
    g_ours = torch.autograd.grad(ours(x).sum(), conv1.weight)[0]
    g_seed = torch.autograd.grad(seed_order(x).sum(), conv1.weight)[0]
    assert torch.equal(g_ours, g_seed)


def test_batchnorm_after_each_conv():
    model = build_model(TrainConfig(batchnorm=True))
    seq = kinds(model)
    assert seq.count(nn.BatchNorm2d) == 2
    for i, kind in enumerate(seq):
        if kind is nn.Conv2d:
            assert seq[i + 1] is nn.BatchNorm2d


def test_dropout_on_fc_inputs_only_in_training():
    model = build_model(TrainConfig(dropout=0.5))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.5, 0.5]
    assert kinds(model.classifier) == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_deeper_net_doubles_convs_and_keeps_head():
    model = build_model(TrainConfig(convs_per_block=2))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 32),
        (32, 32),
        (32, 64),
        (64, 64),
    ]
    assert count_parameters(model) == 421_642 + (32 * 32 * 9 + 32) + (64 * 64 * 9 + 64)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_optimizer_switches():
    from mnist_study.training.train import make_optimizer

    model = build_model(TrainConfig())
    adam = make_optimizer(TrainConfig(weight_decay=0.01), model)
    assert type(adam) is torch.optim.AdamW and adam.defaults["weight_decay"] == 0.01
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.05, momentum=0.8, nesterov=True), model)
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.8, True)


def random_affine(x, generator, rotate_deg=10.0, shift=0.1, zoom=0.1):
    return apply_affine(x, draw_affine([len(x)], generator, rotate_deg, shift, zoom))


def test_augmentation_keeps_shape_and_differs_per_image():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0  # the same bar in every image
    out = random_affine(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    # Each image moved differently: no two outputs are equal, and all differ from x.
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3
    assert not torch.allclose(out, x)
    # Mass is roughly kept (small warps of a bar inside the frame).
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.3)


def test_augmentation_is_seeded_and_off_is_identity():
    x = torch.rand(4, 1, 28, 28)
    a = random_affine(x, torch.Generator().manual_seed(1))
    b = random_affine(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    same = random_affine(x, torch.Generator().manual_seed(1), rotate_deg=0, shift=0, zoom=0)
    assert torch.allclose(same, x, atol=1e-5)


def test_a_model_pickled_under_the_old_module_path_still_loads():
    """Models logged before the package had wings name `mnist_study.model.SeedCNN` in
    their pickle (MLflow's pickle format); mnist_study/model.py keeps that name."""
    import pickle

    net = build_model(TrainConfig(batchnorm=True))
    new = pickle.dumps(net, protocol=2)  # GLOBAL opcodes: the module path as text
    old = new.replace(b"cmnist_study.training.model\n", b"cmnist_study.model\n")
    assert b"cmnist_study.model\nSeedCNN\n" in old and old != new
    loaded = pickle.loads(old)
    assert type(loaded) is SeedCNN
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
