"""One copying block trained alone on affine pairs: how fast can its attention learn to copy?

The issue-12 diagnosis (results/README.md) asks why the generator's attention stays uniform.
This isolates one block at one resolution: q and k are 1x1 convolutions of the Fourier codes
of the pose's coordinate maps (the target's warped: where each pixel comes from), exactly what
``coords: pose`` gives each block, with a temperature trained at 0.02 (``temperature_lr``);
the loss is L1 between the copy and the target at that resolution. ``--values`` picks what the
block copies and how its output is read:

- ``pixels``: the source pixels themselves, the copy is the output;
- ``learned``: a 1x1 conv of a conv-norm-activation of the pixels, read by a 1x1 toRGB (the
  generator's value path and decoder in miniature);
- ``learned+pixels``: the same with the pixels also read by the value conv;
- ``copy-init``: ``learned+pixels`` initialised to pass the pixels through (``copy_init: copy``).

    .venv/bin/python suites/diagnosis/lone_block.py --values pixels
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from attnbench.data import AffineCopyDataset, Mannequin
from attnbench.generators.blocks import fourier_features
from attnbench.tasks.hit_rate import hit_mass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--values", choices=["pixels", "learned", "learned+pixels", "copy-init"], required=True
    )
    parser.add_argument("--size", type=int, default=32, help="the block's map side")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = AffineCopyDataset(
        Mannequin(size=(64, 64), sigma=2.0), 400, seed=0, sigma=2.0, coords=True
    )
    channels, size = 32, args.size
    query, key = torch.nn.Conv2d(20, channels, 1), torch.nn.Conv2d(20, channels, 1)
    log_temperature = torch.nn.Parameter(torch.tensor(math.log(16.0)))
    encode = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.LeakyReLU(0.2)
    )
    reads_pixels = args.values in ("learned+pixels", "copy-init")
    value = torch.nn.Conv2d(32 + (3 if reads_pixels else 0), channels, 1)
    to_rgb = torch.nn.Conv2d(channels, 3, 1)
    if args.values == "copy-init":
        with torch.no_grad():
            value.weight[:3].zero_()
            value.weight[:3, 32:35, 0, 0] = torch.eye(3)
            value.bias[:3].zero_()
            to_rgb.weight.zero_()
            to_rgb.weight[:, :3, 0, 0] = torch.eye(3)
            to_rgb.bias.zero_()
    modules = [query, key] + ([] if args.values == "pixels" else [encode, value, to_rgb])
    optimiser = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=args.lr)
    optimiser.add_param_group({"params": [log_temperature], "lr": 0.02})
    start = time.time()
    for step in range(args.steps + 1):
        items = [data[(step * 4 + j) % len(data)] for j in range(4)]
        source = F.adaptive_avg_pool2d(torch.stack([i["source"] for i in items]), size)
        target = F.adaptive_avg_pool2d(torch.stack([i["target"] for i in items]), size)
        theta = torch.stack([i["theta"] for i in items])
        codes = [
            fourier_features(
                F.adaptive_avg_pool2d(torch.stack([i[k][-2:] for i in items]), size), 5
            )
            for k in ("target_pose", "source_pose")
        ]
        q = query(codes[0]).flatten(2).transpose(1, 2) * log_temperature.exp()  # (4, N, C)
        k = key(codes[1]).flatten(2).transpose(1, 2)  # (4, N, C)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(channels), dim=-1)  # (4, N, N)
        if args.values == "pixels":
            values = source.flatten(2).transpose(1, 2)  # (4, N, 3)
            copy = (weights @ values).transpose(1, 2).reshape(source.shape)
        else:
            features = encode(source)
            if reads_pixels:
                features = torch.cat([features, source], dim=1)
            values = value(features).flatten(2).transpose(1, 2)  # (4, N, C)
            copy = to_rgb((weights @ values).transpose(1, 2).reshape(4, channels, size, size))
        loss = F.l1_loss(copy, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            masses, count = hit_mass(weights.detach()[:, None], theta, (size, size), (size, size))
            print(
                f"step {step}: loss {loss.item():.4f}, hit rate r1 {masses[1] / count:.3f}, "
                f"r2 {masses[2] / count:.3f}, temperature {log_temperature.exp().item():.1f}, "
                f"{time.time() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
