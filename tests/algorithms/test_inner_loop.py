"""The shared inner loop's options beyond plain full-batch SGD: the Adam rule and inner mini-batches.

Plain SGD (MAML's inner loop) is held against unrolled autograd in test_maml.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms.inner_loop import adam_step, inner_loop
from metarun.models.conv4 import Conv4
from metarun.models.layers import Classifier
from tests.algorithms.synthetic import max_abs_diff, perturb_batch_norm

F64 = torch.float64


def make_model(seed=0):
    torch.manual_seed(seed)
    model = Classifier(Conv4(hidden=3, layers=2, image_size=8), n_way=5).to(F64)
    return perturb_batch_norm(model)


def make_support(n_items=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_items, 1, 8, 8, generator=g, dtype=F64)  # [N*K, C, H, W]
    y = torch.arange(5).repeat(n_items // 5)  # [N*K]
    return x, y


def hand_adam(model, params, x, y, steps, lr, betas, eps=1e-8, indices=None, create_graph=False):
    """Adam written out (Kingma & Ba, 2015, Algorithm 1), moments from zero, autograd.grad per step."""
    beta1, beta2 = betas
    names = list(params)
    fast = [params[n] for n in names]
    m = [torch.zeros_like(w) for w in fast]
    v = [torch.zeros_like(w) for w in fast]
    for t in range(1, steps + 1):
        xb, yb = (x, y) if indices is None else (x[indices[t - 1]], y[indices[t - 1]])
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in fast]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves)), (xb,)), yb)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads)]
        v = [beta2 * vi + (1 - beta2) * g**2 for vi, g in zip(v, grads)]
        fast = [
            w - lr * (mi / (1 - beta1**t)) / (torch.sqrt(vi / (1 - beta2**t)) + eps)
            for w, mi, vi in zip(fast, m, v)
        ]
    return dict(zip(names, fast))


@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.99)])
def test_adam_inner_loop_matches_hand_written_adam(betas):
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = make_support()
    adapted = inner_loop(
        model,
        params,
        x,
        y,
        adaptation_steps=4,
        inner_lr=0.01,
        first_order=True,
        inner_optimizer="adam",
        adam_betas=betas,
    )
    reference = hand_adam(model, params, x, y, steps=4, lr=0.01, betas=betas)
    diff = max_abs_diff(adapted, reference)
    print(f"Adam inner loop {betas} vs hand-written Adam: max abs diff {diff:.2e}")
    assert diff < 1e-13
    assert max_abs_diff(adapted, params) > 1e-3  # it moved: about lr per step and coordinate


def test_second_order_adam_inner_loop_matches_hand_written_adam_gradient():
    model = make_model()
    params = dict(model.named_parameters())
    x, y = make_support()
    query_x, query_y = make_support(seed=2)

    def query_loss(adapted):
        return F.cross_entropy(functional_call(model, adapted, (query_x,)), query_y)

    adapted = inner_loop(
        model,
        params,
        x,
        y,
        adaptation_steps=2,
        inner_lr=0.01,
        inner_optimizer="adam",
        adam_betas=(0.9, 0.99),
    )
    grads = torch.autograd.grad(query_loss(adapted), list(params.values()))
    reference = hand_adam(
        model, params, x, y, steps=2, lr=0.01, betas=(0.9, 0.99), create_graph=True
    )
    ref_grads = torch.autograd.grad(query_loss(reference), list(params.values()))
    diff = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    print(f"second-order Adam inner loop vs hand-written: max abs meta-gradient diff {diff:.2e}")
    assert diff < 1e-11
    assert all(torch.isfinite(g).all() for g in grads)


def test_adam_step_matches_torch_optim_adam():
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=F64)
    grads = [torch.randn(4, 3, dtype=F64) for _ in range(5)]
    betas, lr, eps = (0.0, 0.999), 0.01, 1e-8
    leaf = w.clone().requires_grad_()
    optimizer = torch.optim.Adam([leaf], lr=lr, betas=betas, eps=eps)
    fast, moments = {"w": w}, {"w": (torch.zeros_like(w), torch.zeros_like(w))}
    for step, g in enumerate(grads, start=1):
        leaf.grad = g.clone()
        optimizer.step()
        fast, moments = adam_step(fast, {"w": g}, moments, step, lr, betas, eps)
    diff = (fast["w"] - leaf.detach()).abs().max().item()
    print(f"adam_step vs torch.optim.Adam, 5 steps: max abs diff {diff:.2e}")
    assert diff < 1e-15


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_batch_indices_select_the_support_items_of_each_step(inner_optimizer):
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = make_support(n_items=10)
    indices = torch.tensor([[0, 3, 5, 7], [9, 1, 2, 4], [6, 8, 0, 3]])  # [steps, B]
    adapted = inner_loop(
        model,
        params,
        x,
        y,
        adaptation_steps=3,
        inner_lr=0.1,
        first_order=True,
        inner_optimizer=inner_optimizer,
        batch_indices=indices,
    )
    if inner_optimizer == "adam":
        reference = hand_adam(
            model, params, x, y, steps=3, lr=0.1, betas=(0.9, 0.999), indices=indices
        )
    else:
        names, reference_list = list(params), list(params.values())
        for rows in indices:
            leaves = [w.detach().requires_grad_() for w in reference_list]
            loss = F.cross_entropy(
                functional_call(model, dict(zip(names, leaves)), (x[rows],)), y[rows]
            )
            reference_list = [
                w - 0.1 * g for w, g in zip(leaves, torch.autograd.grad(loss, leaves))
            ]
        reference = {n: w.detach() for n, w in zip(names, reference_list)}
    diff = max_abs_diff(adapted, reference)
    print(f"{inner_optimizer} on mini-batches vs hand loop: max abs diff {diff:.2e}")
    assert diff < 1e-13
    full = inner_loop(
        model,
        params,
        x,
        y,
        adaptation_steps=3,
        inner_lr=0.1,
        first_order=True,
        inner_optimizer=inner_optimizer,
    )
    assert max_abs_diff(adapted, full) > 1e-4  # the mini-batches are not the full set


def test_batch_indices_of_every_item_in_order_equal_the_full_support_set():
    model = make_model()
    params = dict(model.named_parameters())
    x, y = make_support()
    every = torch.arange(10).repeat(2, 1)  # [steps, N*K]
    full = inner_loop(model, params, x, y, adaptation_steps=2, inner_lr=0.4)
    batched = inner_loop(model, params, x, y, adaptation_steps=2, inner_lr=0.4, batch_indices=every)
    assert all(torch.equal(full[n], batched[n]) for n in params)


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_vmapped_inner_loop_with_per_task_mini_batches_matches_a_loop(inner_optimizer):
    model = make_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    data = [make_support(seed=s) for s in range(3)]
    support_x = torch.stack([x for x, _ in data])  # [T, N*K, C, H, W]
    support_y = torch.stack([y for _, y in data])  # [T, N*K]
    indices = torch.rand(3, 4, 10, generator=torch.Generator().manual_seed(0)).argsort(-1)[
        ..., :6
    ]  # [T, steps, B]
    settings = dict(
        adaptation_steps=4, inner_lr=0.05, first_order=True, inner_optimizer=inner_optimizer
    )

    def adapt(x, y, idx):
        return inner_loop(model, params, x, y, batch_indices=idx, **settings)

    vmapped = torch.func.vmap(adapt)(support_x, support_y, indices)
    for t in range(3):
        looped = adapt(support_x[t], support_y[t], indices[t])
        assert max((vmapped[n][t] - looped[n]).abs().max().item() for n in params) < 1e-13


def test_inner_loop_rejects_an_unknown_optimizer_and_a_batch_count_other_than_the_steps():
    model = make_model()
    params = dict(model.named_parameters())
    x, y = make_support()
    with pytest.raises(ValueError, match="sgd, adam"):
        inner_loop(model, params, x, y, adaptation_steps=1, inner_lr=0.1, inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="one per step"):
        two_batches = torch.zeros(2, 4, dtype=torch.long)
        inner_loop(model, params, x, y, adaptation_steps=3, inner_lr=0.1, batch_indices=two_batches)
