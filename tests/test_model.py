"""The MLP's batch norm computes DESIGN.md's equations; every placement/activation trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_onnx.errors import UsageError
from bn_onnx.model import ACTIVATIONS, BN_PLACEMENTS, MLP, MLPConfig, expected_tensor_shapes

F64 = np.float64
_erf = np.vectorize(math.erf)

NP_ACT = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def np_bn(z: np.ndarray, t: dict, prefix: str, eps: float, training: bool) -> np.ndarray:
    """DESIGN.md: batch mean and biased batch variance in training, running stats otherwise."""
    if training:
        mu = z.mean(axis=0)
        var = ((z - mu) ** 2).mean(axis=0)
    else:
        mu = t[f"{prefix}.running_mean"].astype(F64)
        var = t[f"{prefix}.running_var"].astype(F64)
    z_norm = (z - mu) / np.sqrt(var + eps)
    if f"{prefix}.weight" in t:
        return t[f"{prefix}.weight"].astype(F64) * z_norm + t[f"{prefix}.bias"].astype(F64)
    return z_norm


def np_forward(model: MLP, x: np.ndarray, training: bool) -> np.ndarray:
    """float64 numpy forward of `model` (dropout off); the input norm always uses its stats."""
    c = model.config
    t = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h = x.astype(F64)
    if c.input_norm:
        h = np_bn(h, t, "input_norm", c.bn_eps, training=False)
    act = NP_ACT[c.activation]
    for i in range(len(c.hidden)):
        z = h @ t[f"blocks.{i}.linear.weight"].astype(F64).T + t[f"blocks.{i}.linear.bias"]
        if c.bn == "pre":
            h = act(np_bn(z, t, f"blocks.{i}.bn", c.bn_eps, training))
        elif c.bn == "post":
            h = np_bn(act(z), t, f"blocks.{i}.bn", c.bn_eps, training)
        else:
            h = act(z)
    return h @ t["head.weight"].astype(F64).T + t["head.bias"]


def randomized_model(config: MLPConfig, seed: int) -> MLP:
    """A model with non-trivial BN parameters and running statistics."""
    torch.manual_seed(seed)
    model = MLP(config)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name.endswith(("bn.weight", "bn.bias", "running_mean")):
                value.copy_(torch.from_numpy(rng.normal(size=value.shape).astype(np.float32)))
            elif name.endswith("running_var"):
                value.copy_(torch.from_numpy(rng.uniform(0.2, 3.0, value.shape).astype(np.float32)))
    return model


config_strategy = st.builds(
    MLPConfig,
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    activation=st.sampled_from(ACTIVATIONS),
    bn=st.sampled_from(BN_PLACEMENTS),
    bn_eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    input_norm=st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(config=config_strategy, batch=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_training_forward_matches_numpy_batch_statistics(config, batch, seed):
    model = randomized_model(config, seed)
    x = np.random.default_rng(seed + 1).normal(size=(batch, config.in_features)) * 3 + 1
    model.train()
    out = model(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    # Only running statistics changed, which a training forward does not read (the frozen
    # input norm's did not change), so the numpy forward can use the updated model.
    want = np_forward(model, x, training=True)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(config=config_strategy, batch=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_eval_forward_matches_numpy_running_statistics(config, batch, seed):
    model = randomized_model(config, seed).eval()
    x = np.random.default_rng(seed + 1).normal(size=(batch, config.in_features)) * 3 + 1
    out = model(torch.from_numpy(x.astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(out, np_forward(model, x, training=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bn", ["pre", "post"])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_running_statistics_update_uses_unbiased_batch_variance(bn, momentum):
    # PyTorch normalizes with the biased batch variance but stores the UNBIASED one:
    # running_var <- (1 - m) * running_var + m * var_batch * n / (n - 1).
    config = MLPConfig(3, 2, hidden=(4, 5), bn=bn, bn_momentum=momentum, activation="tanh")
    model = randomized_model(config, seed=7)
    before = {k: v.clone().double().numpy() for k, v in model.state_dict().items()}
    seen: dict[int, np.ndarray] = {}
    for i, block in enumerate(model.blocks):
        block.bn.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().double().numpy())
        )
    n = 5
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(n, 3)).astype(np.float32))
    model.train()
    model(x)
    after = {k: v.double().numpy() for k, v in model.state_dict().items()}
    for i, h in seen.items():
        mu = h.mean(axis=0)
        biased = ((h - mu) ** 2).mean(axis=0)
        unbiased = biased * n / (n - 1)
        p = f"blocks.{i}.bn."
        np.testing.assert_allclose(
            after[p + "running_mean"],
            (1 - momentum) * before[p + "running_mean"] + momentum * mu,
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            after[p + "running_var"],
            (1 - momentum) * before[p + "running_var"] + momentum * unbiased,
            rtol=1e-5,
            atol=1e-6,
        )
        with_biased = (1 - momentum) * before[p + "running_var"] + momentum * biased
        assert not np.allclose(after[p + "running_var"], with_biased, rtol=1e-5, atol=1e-6)
        assert after[p + "num_batches_tracked"] == before[p + "num_batches_tracked"] + 1
    assert sorted(seen) == [0, 1]


def test_bn_with_gamma_sqrt_var_and_beta_mu_is_identity_in_eval():
    config = MLPConfig(4, 2, hidden=(6,), bn="pre", input_norm=False, bn_eps=1e-3)
    model = randomized_model(config, seed=1).eval()
    bn = model.blocks[0].bn
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
        bn.bias.copy_(bn.running_mean)
        z = torch.randn(5, 6)
        np.testing.assert_allclose(bn(z).numpy(), z.numpy(), rtol=1e-5, atol=1e-5)


def test_input_norm_stays_frozen_while_training():
    config = MLPConfig(5, 3, hidden=(8,), bn="pre")
    model = MLP(config)
    mean = np.arange(5, dtype=np.float64)
    var = np.linspace(0.5, 2.0, 5)
    model.set_input_stats(mean, var)
    model.train()
    assert not model.input_norm.training
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(16, 5) * 10 + 100
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_array_equal(model.input_norm.running_mean.numpy(), mean.astype(np.float32))
    np.testing.assert_array_equal(model.input_norm.running_var.numpy(), var.astype(np.float32))
    assert int(model.input_norm.num_batches_tracked) == 0
    assert model.blocks[0].bn.num_batches_tracked == 3
    assert not any(p is model.input_norm for p in model.parameters())
    assert model.input_norm.weight is None


def test_input_norm_normalizes_raw_features():
    config = MLPConfig(3, 2, hidden=(4,), input_norm=True, bn_eps=1e-5)
    model = MLP(config)
    model.set_input_stats(np.array([1.0, -2.0, 10.0]), np.array([4.0, 0.25, 1.0]))
    x = torch.tensor([[3.0, -2.0, 11.0]])
    got = model.input_norm(x).numpy()
    want = (np.array([3.0, -2.0, 11.0]) - [1.0, -2.0, 10.0]) / np.sqrt(
        np.array([4.0, 0.25, 1.0]) + 1e-5
    )
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(config=config_strategy)
def test_state_dict_names_and_shapes_are_the_contract(config):
    sd = MLP(config).state_dict()
    expected = expected_tensor_shapes(config)
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_state_dict_keys_for_default_config_are_exactly_listed():
    keys = list(MLP(MLPConfig(4, 3, hidden=(5, 2))).state_dict())
    block = [
        "linear.weight",
        "linear.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    assert keys == [
        "input_norm.running_mean",
        "input_norm.running_var",
        "input_norm.num_batches_tracked",
        *[f"blocks.0.{k}" for k in block],
        *[f"blocks.1.{k}" for k in block],
        "head.weight",
        "head.bias",
    ]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bn", BN_PLACEMENTS)
@pytest.mark.cpu_sensitive
def test_every_placement_and_activation_trains(bn, activation):
    torch.manual_seed(0)
    config = MLPConfig(6, 3, hidden=(16, 8), bn=bn, activation=activation, dropout=0.1)
    model = MLP(config)
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    model.train()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    # sigmoid without BN learns slowest (about 0.84x in 30 steps); all others reach < 0.7x.
    # Over seeds 0-19 the worst ratio was 0.837, so 0.9 holds on other CPUs' kernels too.
    assert losses[-1] < 0.9 * losses[0]
    model.eval()
    out = model(x)
    assert out.shape == (32, 3)
    assert torch.isfinite(out).all()


def test_regression_output_has_one_column_per_target():
    model = MLP(MLPConfig(4, 2, hidden=(8,), task="regression")).eval()
    assert model(torch.randn(7, 4)).shape == (7, 2)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"activation": "swish"}, "unknown activation"),
        ({"bn": "both"}, "unknown bn placement"),
        ({"task": "ranking"}, "unknown task"),
        ({"hidden": (8, 0)}, "hidden size"),
        ({"in_features": 0}, "in_features"),
        ({"bn_eps": 0.0}, "bn_eps"),
        ({"dropout": 1.0}, "dropout"),
        ({"bn_momentum": 1.5}, "bn_momentum"),
    ],
)
def test_bad_config_is_a_one_line_usage_error(kwargs, fragment):
    base = {"in_features": 3, "out_features": 2}
    with pytest.raises(UsageError, match=fragment) as info:
        MLPConfig(**{**base, **kwargs})
    assert "\n" not in str(info.value)


def test_config_dict_round_trip_and_unknown_keys():
    config = MLPConfig(3, 2, hidden=(4, 5), bn="post", activation="gelu", dropout=0.2)
    assert MLPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UsageError, match="unknown key"):
        MLPConfig.from_dict({**config.to_dict(), "evil": 1})
    with pytest.raises(UsageError, match="missing key"):
        MLPConfig.from_dict({"out_features": 2})
