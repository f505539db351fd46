"""What counts as one example in RL: a copy's rollout, or an observation (biased), measured on CartPole.

At fixed weights (learning rate 0), three meters watch the same stream of updates (the same seed
gives the same rollouts): the k-way estimator over groups of copies (``microbatch``), per-example
norms over copies (``per_example``, a rollout of ``T`` observations is one example) and per-example
norms over observations (``example="observation"``: each observation counted as an independent
example). The first two are unbiased for the noise of a batch of independent copies; the third
ignores the correlation of the observations of one episode.

With ``Sigma_obs`` the covariance of one observation's gradient and ``tr Sigma_eff = T tr
Cov(rollout mean)`` the noise that really averages out over a batch of ``B`` observations, the two
per-example views of the same batch (both subtract their tr Sigma / B from the same |g_bar|^2) obey

    |G|^2_obs = |G|^2_rollout + (tr Sigma_eff - tr Sigma_obs) / B

exactly, step by step; tr Sigma_obs estimates tr Sigma_obs. So a positive correlation within an
episode (tr Sigma_eff > tr Sigma_obs) inflates |G|^2 and deflates tr(Sigma): B_simple comes out
too small. The script prints the three views per group (policy, value) and that identity.

    python benchmarks/rl_correlation.py                 # init and after 300 updates, 1,000 updates each
    python benchmarks/rl_correlation.py --updates 50    # a quick look
"""

from __future__ import annotations

import argparse
import time

import torch

from noisescale.experiments.rl import RLTrainer, get_rl_task
from noisescale.experiments.training import TrainConfig
from noisescale.meter import NoiseScaleEstimate

MODES = (("microbatch", "rollout"), ("per_example", "rollout"), ("per_example", "observation"))


def measure_at(
    state: dict[str, torch.Tensor], updates: int, batch: int, seed: int
) -> dict[tuple[str, str], NoiseScaleEstimate]:
    """The estimate of each mode after ``updates`` updates at the weights ``state`` (learning rate 0)."""
    task = get_rl_task("cartpole")
    out = {}
    for method, example in MODES:
        k = 4 if method == "microbatch" else None
        config = TrainConfig.for_task(
            task, method=method, microbatches=k, lr=0.0, batch_size=batch, ema_decay=1.0, seed=seed, threads=1
        )  # the same seed and weights: the same rollouts for every view
        with RLTrainer(task, config, example=example) as trainer:
            trainer.model.load_state_dict(state)
            for _ in range(updates):
                trainer.step()
            assert trainer.meter is not None
            out[(method, example)] = trainer.meter.compute()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000, help="updates per measurement")
    parser.add_argument("--trained", type=int, default=300, help="training updates before the second point")
    parser.add_argument("--batch-size", type=int, default=256, help="observations per update (16 per copy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    task = get_rl_task("cartpole")
    torch.set_num_threads(1)
    config = TrainConfig.for_task(task, method=None, batch_size=args.batch_size, seed=args.seed)
    with RLTrainer(task, config) as trainer:
        points = [("initial weights", {k: v.clone() for k, v in trainer.model.state_dict().items()}, None)]
        for _ in range(args.trained):
            record = trainer.step()
        ret = None if args.trained == 0 else record.mean_return
        points.append((f"after {args.trained} updates", dict(trainer.model.state_dict()), ret))
    b = args.batch_size
    for name, state, ret in points:
        start = time.process_time()
        ests = measure_at(state, args.updates, b, args.seed + 1)
        seconds = time.process_time() - start
        said = "" if ret is None else f", mean return {ret:.0f}"
        print(f"\n{name}{said}: {args.updates} updates of {b} observations at lr 0 ({seconds:.0f} s CPU)")
        print(f"{'group':7} {'view':26} {'|G|^2':>10} {'tr Sigma':>10} {'B_simple':>22}")
        for group in ("policy", "value"):
            for method, example in MODES:
                g = ests[(method, example)].groups[group]
                ci = g.b_simple_ci
                shown = "not resolved" if ci is None else f"{g.b_simple:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"
                view = f"{method} / {example}"
                print(f"{group:7} {view:26} {g.grad_norm_sq:10.4g} {g.trace_sigma:10.4g} {shown:>22}")
            unbiased = ests[("per_example", "rollout")].groups[group]
            per_obs = ests[("per_example", "observation")].groups[group]
            identity = unbiased.grad_norm_sq + (unbiased.trace_sigma - per_obs.trace_sigma) / b
            ratio = unbiased.trace_sigma / per_obs.trace_sigma
            print(f"{group:7} tr Sigma_eff / tr Sigma_obs = {ratio:.2f}; "
                  f"|G|^2_rollout + (tr Sigma_eff - tr Sigma_obs)/B = {identity:.4g}")  # fmt: skip


if __name__ == "__main__":
    main()
