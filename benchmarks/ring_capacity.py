"""How well can the one-step MLP represent the teacher's own noise-to-sample map on the ring?

    python benchmarks/ring_capacity.py                       # 3x128 MLP, 4000 steps, constant and cosine lr
    python benchmarks/ring_capacity.py --hidden 256 --depth 4 --steps 12000

No distribution matching: the generator (the same fitted start network as ``dibregman distill``, seed 0) is
regressed onto pairs of unit noise and the teacher's exact 35-NFE ODE sample from it (``teacher_samples(...,
return_noise=True)``, 20,000 pairs; 20,000 held-out pairs to test). If even this leaves off-mode mass, the
distillation's off-mode mass is the generator's limit, not the divergence's.
"""

from __future__ import annotations

import argparse
import math

import torch

from dibregman.generator import OneStepGenerator
from dibregman.metrics.toy import mode_weight_tv, off_mode_mass
from dibregman.teachers import load_teacher
from dibregman.train.components import fit_network, teacher_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher = load_teacher("gmm:ring8_imbalanced")
    cpu = torch.device("cpu")
    x, z = teacher_samples(teacher, 20000, 6, cpu, return_noise=True)
    x_test, z_test = teacher_samples(teacher, 20000, 9, cpu, return_noise=True)
    print(f"teacher's own samples: off_mode {off_mode_mass(x_test, teacher):.4f}, "
          f"mode_tv {mode_weight_tv(x_test, teacher):.4f}")
    for schedule in ("constant", "cosine"):
        torch.manual_seed(0)
        base = fit_network(teacher, args.hidden, args.depth, 1500, 256, torch.Generator().manual_seed(3), cpu)
        gen = OneStepGenerator.from_teacher(base, 2.5)
        opt = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.0, 0.99))  # the distill defaults
        g = torch.Generator().manual_seed(0)
        for step in range(1, args.steps + 1):
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            j = torch.randint(len(z), (256,), generator=g)
            loss = ((gen(z[j]) - x[j]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            y = gen(z_test)
        print(f"MLP {args.depth}x{args.hidden}, {args.steps} steps, {schedule} lr {args.lr:g}: test mse "
              f"{((y - x_test) ** 2).mean().item():.4f}, off_mode {off_mode_mass(y, teacher):.4f}, "
              f"mode_tv {mode_weight_tv(y, teacher):.4f}")


if __name__ == "__main__":
    main()
