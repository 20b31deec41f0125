"""Shapes, conditioning, exact round-trips, generation and training stability of cvae models."""
from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import cvae
from cvae import ConfigError, ModelConfig
from cvae.config import CONDITIONINGS, LIKELIHOODS
from cvae.conv import stage_sizes
from cvae.registry import _BUILDERS

FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# Tiny widths keep the whole grid well under a second per case on 2 CPU cores.
ARCHS = {
    "mlp": dict(arch="mlp", hidden=(16, 8)),
    "conv-transpose": dict(arch="conv", channels=(4, 8), conv_decoder="transpose"),
    "conv-transpose-bn": dict(arch="conv", channels=(4, 8), conv_decoder="transpose", batch_norm=True),
    "conv-upsample": dict(arch="conv", channels=(4, 8), conv_decoder="upsample"),
    "conv-upsample-bn": dict(arch="conv", channels=(4, 8), conv_decoder="upsample", batch_norm=True),
}


def _model(image_shape=(1, 28, 28), num_classes=10, **kw) -> cvae.CVAE:
    torch.manual_seed(0)
    return cvae.build(ModelConfig(**kw), image_shape=image_shape, num_classes=num_classes)


def _batch(n=4, shape=(1, 28, 28), num_classes=10):
    g = torch.Generator().manual_seed(1)
    return torch.rand((n, *shape), generator=g), torch.arange(n) % num_classes


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_grid_shapes_loss_and_backward(arch, conditioning, likelihood):
    model = _model(**ARCHS[arch], conditioning=conditioning, likelihood=likelihood, latent_dim=3)
    x, y = _batch()
    mu, logvar = model.encode(x, y)
    assert mu.shape == logvar.shape == (4, 3)
    assert model.decode(mu, y).shape == x.shape
    out = model(x, y)
    assert out.decoded.shape == x.shape and out.z.shape == (4, 3)
    terms = cvae.negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z,
                               kl_weight=1.0)
    assert torch.isfinite(terms.loss)
    terms.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    samples = model.sample([0, 9], n=3) if model.conditional else model.sample(n=6)
    assert samples.shape == (6, 1, 28, 28)
    assert samples.min() >= 0 and samples.max() <= 1
    assert model.reconstruct(x, y).shape == x.shape


@pytest.mark.parametrize("arch", ["mlp", "conv-transpose", "conv-upsample"])
def test_latent_dim_one(arch):
    model = _model(**ARCHS[arch], latent_dim=1)
    x, y = _batch()
    out = model(x, y)
    assert out.mu.shape == (4, 1) and out.decoded.shape == x.shape


def test_mlp_hidden_three_widths_and_string_form():
    cfg = ModelConfig(arch="mlp", hidden="64,16,8")
    assert cfg.hidden == (64, 16, 8)
    model = cvae.build(cfg)
    widths = [m.out_features for m in model.encoder.body if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 16, 8]
    decoder_widths = [m.out_features for m in model.decoder.body if isinstance(m, torch.nn.Linear)]
    assert decoder_widths == [8, 16, 64]
    x, y = _batch()
    assert model(x, y).decoded.shape == x.shape


@pytest.mark.parametrize("mode", ["transpose", "upsample"])
@pytest.mark.parametrize("shape,channels", [
    ((1, 28, 28), (2, 3, 4)),   # 28 -> 14 -> 7 -> 4 and back
    ((1, 20, 24), (2, 3)),      # non-square
    ((3, 7, 5), (2, 2, 2, 2)),  # odd sizes, more stages than halvings
    ((1, 1, 1), (2,)),
])
@pytest.mark.parametrize("conditioning", ["channel", "concat"])
def test_conv_round_trips_exactly(mode, shape, channels, conditioning):
    model = _model(image_shape=shape, arch="conv", channels=channels, conv_decoder=mode,
                   conditioning=conditioning, latent_dim=2)
    x, y = _batch(n=2, shape=shape)
    assert model(x, y).decoded.shape == x.shape
    # Every decoder stage lands on the encoder's recorded size: no crop, no pad anywhere.
    sizes = stage_sizes(shape[1], shape[2], len(channels))
    h = model.decoder.project(torch.cat([torch.zeros(2, 2), torch.eye(10)[:2]], 1))
    h = h.view(-1, *model.decoder.start_shape)
    for stage, expected in zip(model.decoder.stages, reversed(sizes[:-1])):
        h = stage(h)
        assert tuple(h.shape[-2:]) == expected


def test_stage_sizes_28():
    assert stage_sizes(28, 28, 3) == [(28, 28), (14, 14), (7, 7), (4, 4)]


def test_encoder_sees_label_only_for_concat_and_channel():
    x, _ = _batch(n=2)
    for conditioning, sees in [("concat", True), ("channel", True), ("decoder", False)]:
        for arch in ("mlp", "conv-transpose"):
            model = _model(**ARCHS[arch], conditioning=conditioning).eval()
            mu0, _ = model.encode(x, torch.tensor([0, 0]))
            mu1, _ = model.encode(x, torch.tensor([5, 5]))
            assert (not torch.allclose(mu0, mu1)) == sees, (conditioning, arch)
            z = torch.zeros(2, model.latent_dim)
            assert not torch.allclose(model.decode(z, torch.tensor([0, 0])),
                                      model.decode(z, torch.tensor([5, 5])))


def test_unconditional_ignores_labels_and_needs_none():
    model = _model(arch="mlp", hidden=(8,), conditioning="none").eval()
    x, y = _batch()
    assert torch.equal(model.encode(x, None)[0], model.encode(x, y)[0])
    assert model.sample(n=5).shape == (5, 1, 28, 28)
    assert model.sample(labels=[1, 2], n=5).shape == (5, 1, 28, 28)


@pytest.mark.parametrize("arch", ["mlp", "conv-transpose"])
def test_wrong_labels_raise_clear_errors(arch):
    model = _model(**ARCHS[arch], conditioning="concat").eval()  # inference validates label ranges
    x, _ = _batch()
    with pytest.raises(ValueError, match="labels are required"):
        model(x, None)
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        model(x, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        model.encode(x, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="labels"):
        model.decode(torch.zeros(4, model.latent_dim), None)
    with pytest.raises(ValueError, match="needs labels"):
        model.sample(n=2)
    with pytest.raises(ValueError, match=r"label 10 is outside"):
        model.sample([10])
    with pytest.raises(ValueError, match="3 labels for a batch of 4"):
        model(x, torch.tensor([0, 1, 2]))


def test_sample_is_label_major_and_seeded():
    model = _model(arch="mlp", hidden=(8,), conditioning="decoder", latent_dim=2)
    got = model.sample([3, 7], n=2, generator=torch.Generator().manual_seed(5))
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(z, torch.tensor([3, 3, 7, 7])))
    torch.testing.assert_close(got, expected)
    again = model.sample([3, 7], n=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, again)


def test_generation_leaves_batchnorm_and_mode_alone():
    model = _model(**ARCHS["conv-transpose-bn"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    model.sample([1], n=1)  # a batch of one would fail BatchNorm in train mode
    model.reconstruct(x, y)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    r = model.reconstruct(x, y)
    assert torch.equal(r, model.reconstruct(x, y))  # posterior mean: no sampling
    assert r.min() >= 0 and r.max() <= 1


def test_logvar_is_clamped():
    model = _model(arch="mlp", hidden=(4,))
    with torch.no_grad():
        model.encoder.logvar.bias.fill_(1e4)
    _, logvar = model.encode(*_batch())
    assert logvar.max().item() == 8.0


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_gaussian_log_std_storage(variance):
    model = _model(arch="mlp", hidden=(4,), likelihood="gaussian", gaussian_variance=variance,
                   gaussian_std=0.5)
    assert "log_std" in model.state_dict()
    assert model.log_std.item() == pytest.approx(np.log(0.5))
    assert isinstance(model.log_std, torch.nn.Parameter) == (variance == "learned")
    assert _model(arch="mlp", hidden=(4,)).log_std is None


def test_autocast_bf16_losses_are_float32():
    model = _model(**ARCHS["conv-transpose"], likelihood="gaussian")
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
        nll = model.reconstruction_nll(out.decoded, x)
        terms = cvae.negative_elbo(nll, out.mu, out.logvar, out.z, 1.0)
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)


@pytest.mark.parametrize("field,kwargs,accepted", [
    ("model.arch", dict(arch="transformer"), ["mlp", "conv"]),
    ("model.latent_dim", dict(latent_dim=0), []),
    ("model.latent_dim", dict(latent_dim=2.5), []),
    ("model.conditioning", dict(conditioning="film"), list(CONDITIONINGS)),
    ("model.likelihood", dict(likelihood="poisson"), list(LIKELIHOODS)),
    ("model.hidden", dict(hidden=()), []),
    ("model.channels", dict(channels=(8, 0)), []),
    ("model.activation", dict(activation="gelu"), ["relu", "silu", "elu", "leaky_relu", "tanh"]),
    ("model.conv_decoder", dict(conv_decoder="pixelshuffle"), ["transpose", "upsample"]),
])
def test_invalid_config_names_field(field, kwargs, accepted):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    message = str(info.value)
    assert field in message
    for choice in accepted:
        assert choice in message


def test_register_architecture_extends_choices():
    def builder(cfg, image_shape, num_classes):
        return cvae.registry.build_networks(ModelConfig(arch="mlp", hidden=(4,), conditioning=cfg.conditioning,
                                                        latent_dim=cfg.latent_dim), image_shape, num_classes)

    cvae.register_architecture("tiny_test_arch", builder)
    try:
        assert "tiny_test_arch" in cvae.architecture_names()
        model = cvae.build(ModelConfig(arch="tiny_test_arch", latent_dim=2))
        assert model(*_batch()).decoded.shape == (4, 1, 28, 28)
    finally:
        _BUILDERS.pop("tiny_test_arch")
    assert cvae.architecture_names()[:2] == ("mlp", "conv")


def _fashion_mnist(n=512) -> torch.Tensor:
    if not FASHION_TRAIN.exists():
        pytest.skip(f"{FASHION_TRAIN} not found")
    with gzip.open(FASHION_TRAIN, "rb") as f:
        raw = np.frombuffer(f.read(16 + n * 28 * 28), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.copy()).view(n, 1, 28, 28).float() / 255.0


@pytest.mark.parametrize("arch,likelihood", list(itertools.product(
    ["mlp", "conv"], ["bernoulli", "gaussian", "discretized_logistic"])))
def test_training_is_numerically_stable(arch, likelihood):
    images = _fashion_mnist()
    labels = torch.arange(images.shape[0]) % 10  # any labels will do for stability
    kw = dict(hidden=(32, 16)) if arch == "mlp" else dict(channels=(4, 8), batch_norm=True)
    model = _model(arch=arch, likelihood=likelihood, gaussian_variance="learned", gaussian_std=0.3,
                   latent_dim=4, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        idx = torch.randint(0, images.shape[0], (64,), generator=g)
        x, y = images[idx], labels[idx]
        out = model(x, y)
        terms = cvae.negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z,
                                   kl_weight=1.0)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
    assert all(np.isfinite(losses)), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


# --- Keras details the reference presets need -------------------------------------------------

def test_glorot_uniform_init_keeps_each_layer_within_its_limit_with_zero_biases():
    model = _model(arch="ref-conv-label-channel", conditioning="channel", init="glorot_uniform")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert layers
    for layer in layers:
        parts = layer.weight.chunk(getattr(layer, "keras_parts", 1), dim=0)
        for part in parts:
            fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(part)
            limit = (6.0 / (fan_in + fan_out)) ** 0.5
            assert part.abs().max() <= limit
            assert part.abs().max() > 0.8 * limit  # uniform over the whole range, not a smaller default
        assert layer.bias is None or torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # PyTorch's default leaves non-zero biases: the option really changes the initialisation.
    default = _model(arch="ref-conv-label-channel", conditioning="channel")
    assert any(m.bias is not None and m.bias.abs().sum() > 0 for m in default.modules()
               if isinstance(m, torch.nn.Linear))


def test_batch_norm_momentum_and_eps_reach_every_batch_norm_layer():
    model = _model(arch="ref-conv-label-channel", conditioning="channel", batch_norm_momentum=0.01,
                   batch_norm_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 and all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
    # Keras momentum 0.99: the running mean moves 1% of the way to a batch's mean.
    norm = norms[0]
    norm.train()
    norm(torch.full((4, 16, 3, 3), 5.0))
    torch.testing.assert_close(norm.running_mean, torch.full((16,), 0.05))


def test_activity_l2_adds_the_gradient_of_the_keras_penalty_and_nothing_to_the_loss():
    x, y = _batch(n=6)
    plain = _model(arch="mlp", hidden=(12, 8), latent_dim=2)
    penalised = _model(arch="mlp", hidden=(12, 8), latent_dim=2, activity_l2=0.01)
    penalised.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    out = penalised(x, y, generator=g)
    loss = cvae.negative_elbo(penalised.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z, 1.0).loss
    loss.backward()

    # Reference: the same loss plus 0.01 * mean over the batch of sum_j h_j^2 on the first hidden layer.
    hidden = []
    handle = plain.encoder.body[1].register_forward_hook(lambda module, args, output: hidden.append(output))
    out_ref = plain(x, y, generator=torch.Generator().manual_seed(3))
    handle.remove()
    loss_ref = cvae.negative_elbo(plain.reconstruction_nll(out_ref.decoded, x), out_ref.mu, out_ref.logvar,
                                  out_ref.z, 1.0).loss
    torch.testing.assert_close(loss, loss_ref)  # the logged value is the ELBO alone
    (loss_ref + 0.01 * hidden[0].pow(2).sum(1).mean()).backward()
    for (name, p), p_ref in zip(penalised.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    assert penalised.encoder.body[0].weight.grad.sub(
        _grad_without_penalty(plain, x, y)).abs().max() > 0  # the penalty changed something


def _grad_without_penalty(model, x, y):
    model.zero_grad()
    out = model(x, y, generator=torch.Generator().manual_seed(3))
    cvae.negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z, 1.0).loss.backward()
    return model.encoder.body[0].weight.grad.clone()


def test_activity_l2_is_refused_where_the_architecture_has_no_first_hidden_layer_hook():
    with pytest.raises(ConfigError, match="model.activity_l2=0.01 is not valid with model.arch='conv'"):
        _model(arch="conv", activity_l2=0.01)


@pytest.mark.parametrize("field,kwargs", [
    ("model.init", dict(init="he")),
    ("model.batch_norm_momentum", dict(batch_norm_momentum=0.0)),
    ("model.batch_norm_momentum", dict(batch_norm_momentum=1.5)),
    ("model.batch_norm_eps", dict(batch_norm_eps=0.0)),
    ("model.activity_l2", dict(activity_l2=-0.1)),
])
def test_new_model_fields_are_validated(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


# --- any image shape and class count ---------------------------------------------------------------

SHAPES = [(3, 20, 24), (3, 64, 64), (1, 7, 9), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ["mlp", "conv-transpose", "conv-upsample-bn"])
def test_any_image_shape_and_class_count_trains(arch, shape):
    # 3 classes; three stride-2 stages for conv, more than 7x9 has halvings in it.
    kw = dict(ARCHS[arch], channels=(4, 4, 8)) if arch != "mlp" else ARCHS[arch]
    model = _model(image_shape=shape, num_classes=3, **kw, conditioning="channel",
                   likelihood="discretized_logistic", latent_dim=2)
    x, y = _batch(n=4, shape=shape, num_classes=3)
    x = torch.round(x * 255) / 255  # 8-bit levels, as the discretized logistic expects
    out = model(x, y)
    assert out.decoded.shape == x.shape  # exactly the input's shape: nothing cropped or padded
    nll = model.reconstruction_nll(out.decoded, x)
    assert nll.shape == (4,) and torch.isfinite(nll).all()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # a step, then the loss of the stepped model
        out = model(x, y)
        loss = cvae.negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z, 1.0).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # every weight learned
    assert model.sample([0, 2], n=3).shape == (6, *shape)
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\)"):
        model.sample([3])


@pytest.mark.parametrize("shape,sizes", [
    # stride-2 stages: s -> ceil(s / 2); the decoder retraces the recorded sizes in reverse
    ((3, 20, 24), [(20, 24), (10, 12), (5, 6), (3, 3)]),
    ((3, 64, 64), [(64, 64), (32, 32), (16, 16), (8, 8)]),
    ((1, 7, 9), [(7, 9), (4, 5), (2, 3), (1, 2)]),
])
@pytest.mark.parametrize("mode", ["transpose", "upsample"])
def test_conv_stage_sizes_of_odd_and_large_images(shape, sizes, mode):
    assert stage_sizes(shape[1], shape[2], 3) == sizes
    model = _model(image_shape=shape, num_classes=3, arch="conv", channels=(2, 2, 2), conv_decoder=mode,
                   conditioning="decoder", latent_dim=2)
    h = model.decoder.project(torch.zeros(1, 2 + 3)).view(-1, *model.decoder.start_shape)
    assert tuple(h.shape[-2:]) == sizes[-1]
    seen = []
    for stage in model.decoder.stages:
        h = stage(h)
        seen.append(tuple(h.shape[-2:]))
    assert seen == sizes[-2::-1]
    assert tuple(model.decoder.out(h).shape[1:]) == shape


@pytest.mark.parametrize("arch", ["ref-conv-decoder-cond", "ref-conv-label-channel", "ref-conv-vae"])
def test_reference_presets_take_28x28_of_any_channels_and_refuse_other_sizes_in_one_line(arch):
    model = cvae.build(ModelConfig(arch=arch, conditioning="decoder", latent_dim=2), (3, 28, 28), 4)
    x, y = _batch(n=2, shape=(3, 28, 28), num_classes=4)
    assert model(x, y).decoded.shape == x.shape
    with pytest.raises(ConfigError) as info:
        cvae.build(ModelConfig(arch=arch, conditioning="decoder"), (3, 20, 24), 3)
    assert str(info.value) == (f"model.arch={arch!r} is built for 28x28 images, got 20x24; "
                               "choose model.arch=conv or mlp")


@pytest.mark.parametrize("shape", [(1, 28, 28), *SHAPES], ids=lambda s: "x".join(map(str, s)))
def test_the_judge_classifier_takes_any_shape_and_class_count(shape):
    from cvae.classifier_net import MAX_FEATURE_SIDE, ImageClassifier

    net = ImageClassifier(shape, num_classes=7)
    x = torch.rand(2, *shape)
    assert net(x).shape == (2, 7) and net.embed(x).shape == (2, 128)
    flat = net.features[0].in_features
    side = [min((((s + 1) // 2) + 1) // 2, MAX_FEATURE_SIDE) for s in shape[1:]]
    assert flat == 64 * side[0] * side[1]  # 28x28: 64*7*7 as before; 64x64: pooled to 8x8
    if shape == (1, 28, 28):
        assert flat == 64 * 7 * 7
