"""UNICORN-MAML: MAML with one head row copied to the N ways (metarun/algorithms/unicorn_maml.py)."""

import torch

from metarun.algorithms.maml import MAML
from metarun.algorithms.unicorn_maml import UnicornMAML
from metarun.models.conv4 import Conv4
from metarun.trainer import Trainer
from tests.algorithms.synthetic import perturb_batch_norm, random_tasks

F64 = torch.float64
SMALL = dict(hidden=4, layers=2, image_size=8)  # a two-block Conv4 on 8x8 images


def make_unicorn(seed=0, **kwargs) -> UnicornMAML:
    torch.manual_seed(seed)
    learner = UnicornMAML(Conv4(**SMALL), n_way=5, **kwargs).to(F64)
    perturb_batch_norm(learner)
    return learner


def test_it_is_maml_started_from_the_copied_row_and_w_takes_the_sum_of_the_rows_gradients():
    unicorn = make_unicorn(adaptation_steps=2)
    maml = MAML(Conv4(**SMALL), n_way=5, adaptation_steps=2).to(F64)
    maml.load_state_dict(
        {
            **unicorn.state_dict(),
            "model.head.weight": unicorn.model.head.weight.detach().repeat(5, 1),
            "model.head.bias": unicorn.model.head.bias.detach().repeat(5),
        }
    )
    tasks = random_tasks(T=2, n_way=5, k_shot=2, image_size=8)
    for learner in (unicorn, maml):
        learner.zero_grad()
        learner(tasks)[0].backward()
    torch.testing.assert_close(unicorn(tasks)[0], maml(tasks)[0], rtol=1e-12, atol=1e-12)
    head = maml.model.head
    torch.testing.assert_close(
        unicorn.model.head.weight.grad, head.weight.grad.sum(0, keepdim=True)
    )
    torch.testing.assert_close(unicorn.model.head.bias.grad, head.bias.grad.sum(0, keepdim=True))
    body = dict(maml.model.backbone.named_parameters())
    for name, p in unicorn.model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, body[name].grad, rtol=1e-10, atol=1e-12)


def test_its_predictions_do_not_depend_on_how_the_ways_are_numbered():
    learner = make_unicorn(eval_adaptation_steps=3).eval()
    task = random_tasks(T=1, n_way=5, k_shot=2, image_size=8, seed=1)
    permutation = torch.tensor([3, 0, 4, 1, 2])  # way c is called permutation[c]
    logits = learner.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    renamed = learner.adapt(task.support_x[0], permutation[task.support_y[0]])(task.query_x[0])
    torch.testing.assert_close(renamed[:, permutation], logits, rtol=1e-10, atol=1e-12)
    # Plain MAML's rows differ from the start: renaming the ways changes its predictions.
    torch.manual_seed(0)
    maml = perturb_batch_norm(MAML(Conv4(**SMALL), n_way=5, eval_adaptation_steps=3).to(F64)).eval()
    logits = maml.adapt(task.support_x[0], task.support_y[0])(task.query_x[0])
    renamed = maml.adapt(task.support_x[0], permutation[task.support_y[0]])(task.query_x[0])
    assert (renamed[:, permutation] - logits).abs().max() > 1e-3


def test_one_head_row_classifies_tasks_of_any_n_way():
    learner = make_unicorn().eval()
    for n_way in (2, 5, 20):
        tasks = random_tasks(T=2, n_way=n_way, image_size=8)
        loss, accuracy = learner.evaluate(tasks)
        assert loss.shape == accuracy.shape == (2,) and torch.isfinite(loss).all()


def test_unicorn_maml_short_run_learns_well_above_chance(make_config, tmp_path):
    # First-order, 120 steps of 4 tasks: measured 0.61 test accuracy on 5-way 1-shot (0.50 after
    # 60 steps; chance 0.2).
    cfg = make_config(
        "algorithm=unicorn_maml",
        "algorithm.first_order=true",
        "episode.meta_batch_size=4",
        "episode.n_query=5",
        "train.steps=120",
        "train.val_every=120",
        "eval.episodes=100",
    )
    results = Trainer(cfg, tmp_path).run()
    assert results["test_accuracy"] >= 0.45, results["test_accuracy"]
