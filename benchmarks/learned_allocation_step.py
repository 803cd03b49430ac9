"""One outer step of the learned allocation (000 / 003) on SmolLM2-135M with QR-RPCA at 50%: the
time per step and the gradient estimator's variance at a fixed mu, before and after issue 18.

    OMP_NUM_THREADS=1 python benchmarks/learned_allocation_step.py [--repeats 2] [--estimates 10]

Setup as ``SLRConfig(method="qr_rpca", compression_ratio=0.5, rank_ratio=0.25, allocation="learned",
n_samples=32, seq_len=512)``: calibration rows, input norms and the loss closure of the driver
(``compression.statistics``), mu at the uniform start (s = 0.5, kappa = 0.25) and its solution
solved cold (20 QR-RPCA iterations), which also stands for the previous step's warm start.

- **before**: the step as it was: two independent samples, each matrix solved by its own
  ``qr_rpca.decompose`` (20 iterations from the warm start), L_B on 4 fresh rows x 512 tokens,
  g = (L(x) - L(x')) (x - mu) / sigma^2.
- **after**: :func:`hf_slr.allocation.bilevel` 's step with the given ``allocation_kwargs``: the
  solution at mu moved by ``center_iterations``, every sample ``inner_iterations`` from it in
  batched stacks per shape, L_B on the fixed batch.

Times are the best of ``--repeats``. The variance is tr Cov(g) over ``--estimates`` estimates at
the same mu, estimate i drawing its samples (and, with fresh batches, its rows) from seed i for
every estimator (common random numbers across rows of the table); all estimators solve the inner
problem the fast way (1 iteration from the solution at mu), so the variance rows compare the
estimators only. ``|E g|^2`` (the squared norm of the mean) is printed for scale.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import AutoModelForCausalLM

from hf_slr import SLRConfig
from hf_slr.algorithms import qr_rpca
from hf_slr.allocation.bilevel import draw_samples, gradient_estimate, policy_gradient, sample_losses, truncated_gaussian
from hf_slr.allocation.budget import allocate
from hf_slr.allocation.inner import InnerSolver
from hf_slr.calibration import calibration_ids
from hf_slr.compression.capture import capture_block_inputs
from hf_slr.compression.plan import plan_compression
from hf_slr.compression.statistics import allocation_statistics
from hf_slr.integration import decoder_blocks
from hf_slr.testing import demo_model_path

SIGMA2, GAMMA = 5e-2, 5e-2  # 000 Tables 6-7: sigma^2 and gamma0 (the warm-up window)


def best_of(repeats, function):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--estimates", type=int, default=10)
    parser.add_argument("--skip-before-time", action="store_true", help="skip the ~2 min per repeat old step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    config = SLRConfig(method="qr_rpca", compression_ratio=0.5, rank_ratio=0.25, allocation="learned", n_samples=32, seq_len=512)
    plan = plan_compression(model, config)
    input_ids = calibration_ids(config.calibration_data, plan.tokenizer, config.n_samples, config.seq_len, config.seed)
    _, blocks = decoder_blocks(model)
    linears = [{name: model.get_submodule(name) for name in names} for names in plan.blocks]
    with torch.no_grad():
        inputs, calls = capture_block_inputs(model, input_ids)
        statistics = allocation_statistics(model, "learned", blocks, linears, input_ids, inputs, calls)
    weights, norms, lm_loss, n_rows = (statistics[key] for key in ("weights", "norms", "loss", "n_rows"))
    groups = [group for group in plan.blocks if group]
    names = [name for group in groups for name in group]
    shapes = {name: tuple(weights[name].shape) for name in names}
    n_layers = len(groups)
    mu = torch.cat([torch.full((n_layers,), 0.5, dtype=torch.float64), torch.full((len(names),), 0.25, dtype=torch.float64)])
    center = allocate(shapes, groups, mu[:n_layers], mu[n_layers:])
    print(f"setup (model, 32 x 512 calibration, norms pass): {time.perf_counter() - start:.1f} s", flush=True)
    solver = InnerSolver(weights, norms, names)
    cold = best_of(1, lambda: solver.refresh(center, 20, 0))
    print(f"solution at mu, cold, 20 iterations (once per run): {cold:.1f} s", flush=True)

    # --- before: the step up to issue 18 ------------------------------------------------------
    forward_seconds = [0.0]

    def timed_loss(*args):
        start = time.perf_counter()
        value = lm_loss(*args)
        forward_seconds[0] += time.perf_counter() - start
        return value

    record = qr_rpca.ALGORITHM.check({"iterations": 20, "scaling": "none", "seed": 0})
    scaled = {n: w for shape, group in solver.stacks.items() for n, w in zip(group, solver.scaled[shape])}
    scales = {n: d for shape, group in solver.stacks.items() for n, d in zip(group, solver.scales[shape])}
    state = {
        n: (solver.center[shape][0][b], None, solver.center[shape][1][b])
        for shape, group in solver.stacks.items()
        for b, n in enumerate(group)
    }

    def before_step(generator, solve=True):
        rows = torch.randperm(n_rows, generator=generator)[:4]
        samples = [truncated_gaussian(mu, math.sqrt(SIGMA2), GAMMA, generator) for _ in range(2)]
        losses = []
        for x in samples:
            if solve:
                targets = allocate(shapes, groups, x[:n_layers], x[n_layers:])
                approximations = {}
                for name, target in targets.items():
                    s, u, v = qr_rpca.decompose(scaled[name], None, target, record, record_history=False, init=state[name])
                    approximations[name] = (s + u @ v) / scales[name]
            else:  # the same estimator with the fast inner solve (variance rows)
                approximations = solver.approximations(allocate(shapes, groups, x[:n_layers], x[n_layers:]), 1, 0)
            losses.append(float(timed_loss(approximations, rows)))
        return samples, losses, policy_gradient(losses[0], losses[1], samples[0], mu, SIGMA2)

    # --- after: the step of bilevel.learn_allocation ------------------------------------------
    fixed_rows = torch.randperm(n_rows, generator=torch.Generator().manual_seed(0))[:4]

    def after_step(generator, pairs=1, antithetic=True, tokens=64, refresh=True, baseline=None):
        samples = draw_samples(mu, math.sqrt(SIGMA2), GAMMA, pairs, antithetic, generator)
        losses = sample_losses(
            solver, shapes, groups, samples, timed_loss, fixed_rows, tokens, 1, 0, center=mu if refresh else None, center_iterations=1
        )
        return samples, losses, gradient_estimate(losses, samples, mu, SIGMA2, antithetic=antithetic, baseline=baseline)

    print("\n| step | seconds (best of %d) | of which L_B forwards | speed-up |" % args.repeats)
    print("|---|---|---|---|")
    before = None
    if not args.skip_before_time:
        forward_seconds[0] = 0.0
        before = best_of(args.repeats, lambda: before_step(torch.Generator().manual_seed(0)))
        label = "before: 2 independent samples, per-matrix QR-RPCA x 20 iterations, 4 x 512 fresh rows"
        print(f"| {label} | {before:.2f} | {forward_seconds[0] / args.repeats:.2f} (mean) | 1x |", flush=True)
    for label, kwargs in [
        ("after: 1 antithetic pair, batched, 1 shared iteration from mu (+ 1 for mu), fixed 4 x 64 rows (the cost of the defaults)", {}),
        ("after: 2 antithetic pairs, fixed 4 x 64 rows", {"pairs": 2}),
        ("after: 1 antithetic pair, fixed 4 x 128 rows", {"tokens": 128}),
    ]:
        forward_seconds[0] = 0.0
        seconds = best_of(args.repeats + 1, lambda: after_step(torch.Generator().manual_seed(0), **kwargs))
        speedup = f"{before / seconds:.1f}x" if before else "-"
        print(f"| {label} | {seconds:.2f} | {forward_seconds[0] / (args.repeats + 1):.2f} (mean) | {speedup} |", flush=True)

    # --- variance at the fixed mu -------------------------------------------------------------
    def statistics_of(estimates):
        g = torch.stack(estimates)
        return float(g.var(0).sum()), float(g.mean(0).pow(2).sum())

    rows = {}
    n = args.estimates
    rows["paper pair, fresh 4 x 512 rows (before)"] = [before_step(torch.Generator().manual_seed(i), solve=False)[2] for i in range(n)]
    fixed = [after_step(torch.Generator().manual_seed(i), antithetic=False, refresh=False) for i in range(n)]
    rows["paper pair, fixed 4 x 64 rows (CRN)"] = [g for _, _, g in fixed]
    rows["1 antithetic pair, fixed 4 x 64 rows"] = [
        after_step(torch.Generator().manual_seed(i), refresh=False)[2] for i in range(n)
    ]
    rows["2 antithetic pairs, fixed 4 x 64 rows"] = [
        after_step(torch.Generator().manual_seed(i), pairs=2, refresh=False)[2] for i in range(n)
    ]
    # the moving average at a fixed mu: the mean loss of the other estimates' samples (independent of estimate i's)
    losses = torch.stack([ls for _, ls, _ in fixed])
    baselines = [float(torch.cat([losses[:i], losses[i + 1 :]]).mean()) for i in range(n)]
    rows["2 independent samples, moving-average baseline, fixed 4 x 64 rows (default)"] = [
        after_step(torch.Generator().manual_seed(i), antithetic=False, refresh=False, baseline=baselines[i])[2] for i in range(n)
    ]
    print(f"\n| estimator at fixed mu ({n} estimates, seeds 0..{n - 1}) | tr Cov(g) | |E g|^2 | variance vs before |")
    print("|---|---|---|---|")
    reference = None
    for label, estimates in rows.items():
        variance, signal = statistics_of(estimates)
        reference = reference or variance
        print(f"| {label} | {variance:.4g} | {signal:.4g} | {variance / reference:.3f} |", flush=True)


if __name__ == "__main__":
    main()
