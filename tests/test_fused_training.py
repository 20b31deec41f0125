"""Fused training (cvae.fused, training.fused): K models trained as one stacked model give each member
the numbers it gets alone (to float rounding), with its own learning rate, β, warm-up, free bits, seed
and data order; what cannot fuse says why in one line."""
from __future__ import annotations

import pytest
import torch

import cvae
from cvae.config import ModelConfig
from cvae.fused import FusedCVAE, StackedOptimizer, clip_grad_norm_per_member, fusion_refusal, stacked_losses
from pipelines.config import RunConfig, with_overrides

# Per-epoch validation losses of a fused member and of the same run alone: equal within this, relative
# (fp32 on the CPU; the bound). Batched kernels add in another order than a model's own.
EQUAL_REL = 1e-4
TINY = {"data.dataset": "fashion-mnist", "data.limit_train": 600, "data.val_size": 200, "data.limit_test": 100,
        "optim.epochs": 2, "optim.batch_size": 64, "optim.patience": 0, "execution.device": "cpu"}
# Everything a member may have of its own: learning rate, β, warm-up, free bits, seed (hence weights,
# batch order and z draws), gradient clipping, weight decay.
MEMBERS = [
    {"optim.lr": 1e-3, "objective.kl_weight": 3.0, "execution.seed": 0},
    {"optim.lr": 3e-3, "objective.kl_weight": 0.5, "objective.warmup_epochs": 1.5, "execution.seed": 7},
    {"optim.lr": 5e-4, "objective.kl_weight": 1.0, "objective.free_bits": 0.2, "execution.seed": 3,
     "optim.grad_clip": 5.0, "optim.weight_decay": 1e-4},
]
STRUCTURES = {
    "mlp": {"model.arch": "mlp", "model.hidden": (64, 32), "model.latent_dim": 4},
    "conv": {"model.arch": "conv", "model.channels": (4, 8), "model.latent_dim": 4},
}


@pytest.fixture(scope="module")
def splits(data_dir):
    from pipelines.data import load_splits

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVAE_DATA_DIR", str(data_dir))
        patch.setenv("CVAE_OFFLINE", "1")
        yield load_splits(with_overrides(RunConfig(), TINY).data, torch.device("cpu"))


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_a_fused_member_trains_as_it_would_alone(splits, structure):
    from pipelines.training.fused import Member, train_fused
    from pipelines.training.train import train

    configs = [with_overrides(RunConfig(), {**TINY, **STRUCTURES[structure], **member}) for member in MEMBERS]
    fused = train_fused([Member(c, name=f"m{i}") for i, c in enumerate(configs)], splits=splits)
    for index, (config, result) in enumerate(zip(configs, fused)):
        assert not isinstance(result, Exception), result
        alone = train(config, splits=splits)
        fused_losses = [h["val/loss"] for h in result.history]
        alone_losses = [h["val/loss"] for h in alone.history]
        assert fused_losses == pytest.approx(alone_losses, rel=EQUAL_REL), f"member {index}"
        train_losses = [h["train/loss"] for h in result.history]
        assert train_losses == pytest.approx([h["train/loss"] for h in alone.history], rel=EQUAL_REL)
        assert result.fusion == {"population": 3, "members": ["m0", "m1", "m2"], "index": index}
        assert type(result.model) is cvae.CVAE and result.kept_epoch == alone.kept_epoch
        weights = max((a - b).abs().max().item() for a, b in zip(result.model.state_dict().values(),
                                                                 alone.model.state_dict().values()))
        assert weights < 1e-4, f"member {index}: largest weight difference {weights}"


def test_the_stacked_optimizer_is_torch_optim_per_member():
    torch.manual_seed(0)
    for kind, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        lrs, decays = [1e-2, 3e-3], [0.0, 1e-2]
        start = torch.randn(2, 5, 3)
        stacked = start.clone().requires_grad_(True)
        optimizer = StackedOptimizer([stacked], kind, torch.tensor(lrs, dtype=torch.float64),
                                     torch.tensor(decays, dtype=torch.float64))
        alone = [start[k].clone().requires_grad_(True) for k in range(2)]
        extra = {"momentum": 0.9} if kind == "sgd" else {}
        references = [cls([alone[k]], lr=lrs[k], weight_decay=decays[k], **extra) for k in range(2)]
        for _ in range(4):
            grad = torch.randn(2, 5, 3)
            stacked.grad = grad.clone()
            optimizer.step()
            for k in range(2):
                alone[k].grad = grad[k].clone()
                references[k].step()
        for k in range(2):
            assert torch.equal(stacked[k].detach(), alone[k].detach()), f"{kind}: member {k}"


def test_gradient_clipping_is_per_member():
    grads = [torch.randn(3, 4, 2) * torch.tensor([1.0, 100.0, 0.01]).view(3, 1, 1), torch.randn(3, 6)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip_grad_norm_per_member(params, torch.tensor([1.0, 1.0, 0.0]))
    for k in range(3):
        alone = [torch.zeros_like(g[k], requires_grad=True) for g in grads]
        for p, g in zip(alone, grads):
            p.grad = g[k].clone()
        if k < 2:
            torch.nn.utils.clip_grad_norm_(alone, 1.0)
        for p, q in zip(params, alone):
            assert torch.allclose(p.grad[k], q.grad, rtol=1e-6, atol=0), f"member {k}"


def test_the_training_forward_runs_under_vmap_with_labels_checked_at_the_api_edge():
    models = [cvae.build(ModelConfig(hidden=(16,), latent_dim=2)) for _ in range(2)]
    fused = FusedCVAE(models)
    x, y = torch.rand(2, 5, 1, 28, 28), torch.randint(0, 10, (2, 5))
    recon, kl, sampled = fused.terms(x, y, torch.randn(2, 5, 2), sampled=False)
    assert recon.shape == (2, 5) and kl.shape == (2, 5, 2)
    loss, _, _ = stacked_losses(recon, kl, sampled, torch.tensor([1.0, 2.0]), torch.zeros(2), "analytic")
    loss.sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    for k, model in enumerate(models):
        with torch.no_grad():
            out = model(x[k], y[k], noise=torch.zeros(5, 2))
        assert torch.allclose(fused.member(k).encode(x[k], y[k])[0], out.mu)
    with pytest.raises(ValueError, match="label 10 is outside"):
        with models[0].inference():
            models[0](x[0], torch.tensor([0, 1, 2, 3, 10]))


@pytest.mark.parametrize("config, reason", [
    ({"arch": "conv", "batch_norm": True}, "model.batch_norm=true does not fuse"),
    ({"activity_l2": 0.01}, "model.activity_l2=0.01 does not fuse"),
    ({"arch": "ref-conv-vae"}, "model.arch='ref-conv-vae' does not fuse (only mlp and conv do)"),
])
def test_what_cannot_fuse_says_why_in_one_line(config, reason):
    refusal = fusion_refusal(ModelConfig(**config))
    assert refusal is not None and refusal.startswith(reason) and "\n" not in refusal
