"""The pose-morphing task (the GPA paper's headline experiment, Jetchev et al. 2021, section 3.1).

A generator sees an image M1 with its pose B1 (source branch) and another pose B2 of the same
appearance (target branch) and must draw M2, the appearance in pose B2. It is trained with

    L = w_per L_per(G(M1, B1, B2), M2) + w_self L_self + w_gan L_GAN,

where L_per is the suite's reconstruction loss (LPIPS-VGG where its weights exist; the suite
names L1 explicitly where they do not), L_self the affine self-supervision of the copying task
on M1 (G(M1, B1, τ(B1)) against τ(M1), in the same forward as the pose pair), and L_GAN the
non-saturating logistic loss of a StyleGAN2-style discriminator on (image, pose) pairs: real
(M1, B1), fake (G(M1, B1, B2), B2), with a lazy R1 penalty and its own Adam. Both networks are
checkpointed and resumed; under torchrun the discriminator averages its gradients over the ranks.

Metrics on the held-out pairs: L1, SSIM, PSNR, LPIPS and FID (pytorch-fid, between the generated
images and the real targets at the generator's resolution, resized to 299 by the Inception;
unavailable with the missing file named where its weights are absent), and on the synthetic
mannequin the copy score: the share of each target pixel's attention within r pixels of the
source pixel that truly shows the same point of the figure (:meth:`Mannequin.correspondence`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass

from attnbench.data.pose import NUM_KEYPOINTS
from attnbench.suite import CONFIG, PositiveInt
from attnbench.tasks.base import (
    COMPARISON_COLUMNS,
    PAIR_KEYS,
    TEST_SEED,
    Task,
    TaskTable,
    make_source,
    pair_options,
    pose_picture,
    write_grid,
)
from attnbench.tasks.distributed import average_gradients


@dataclass(frozen=True, config=CONFIG)
class GanConfig:
    """The pose task's adversarial loss L_GAN: a StyleGAN2-style discriminator on (image, pose).

    Non-saturating logistic loss; the lazy R1 penalty (gamma / 2 times the squared gradient of
    the real logits by the real images) every ``r1_every`` steps, scaled by ``r1_every``; its
    own Adam (``lr``, betas ``betas``). ``channels``: the discriminator's block widths from the
    full-resolution block down (one per halving to 4x4).
    """

    lr: Annotated[float, Field(gt=0)] = 2e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.0,
        0.99,
    )
    r1_gamma: Annotated[float, Field(ge=0)] = 1.0
    r1_every: PositiveInt = 16
    channels: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (32, 64, 128, 128)


@dataclass(frozen=True, config=CONFIG)
class PoseConfig:
    """The pose task's loss weights: L = perceptual L_per(G(M1, B1, B2), M2) + self L_self
    (the affine self-supervision of M1) + gan L_GAN. L_per and L_self use the suite's
    ``loss`` (l1, lpips or a weighted sum); a weight of 0 leaves its term out."""

    perceptual: Annotated[float, Field(ge=0)] = 1.0
    self: Annotated[float, Field(ge=0)] = 1.0
    gan: Annotated[float, Field(ge=0)] = 0.05
    discriminator: GanConfig = GanConfig()


TABLE = TaskTable(
    "pose",
    "Training: pose morphing (the paper's Table 1)",
    "Held-out metrics of G(M1, B1, B2) against M2 after training, mean ± sample standard "
    "deviation over seeds (runs that diverged or failed are counted in 'runs ok' and left "
    "out of the means). FID is pytorch-fid's between the generated and the real held-out "
    "targets at the generator's resolution (biased upwards from fewer than 2,000 images: "
    "compare values of one sample count only). The copy score is the share of the largest "
    "decoder level's attention mass within 1 (r=1) or 2 pixels (r=2) of the source pixel "
    "that truly shows the same point of the figure (synthetic mannequin pairs only). "
    "Attention memory is the peak of the attention blocks alone at batch 1; step time is "
    "the mean over seeds of each run's median training step (a generator step on the pose "
    "pair and its self-supervision pair, and a discriminator step). The last columns "
    "compare PSNR and the copy score at r=1 with `none` and `full.sdpa` "
    "(difference of the means, Welch's t-test). "
    "`none (no copying at any level)` is Table 1's NO.",
    (
        "label",
        "runs",
        "fid",
        "ssim",
        "lpips",
        "psnr",
        "test_l1",
        "hit_r1",
        "hit_r2",
        "attn_mib",
        "step_ms",
        "steps_done",
        "train_s",
        "n_params",
        *COMPARISON_COLUMNS,
    ),  # fmt: skip
    headers=(("hit_r1", "copy score r=1"), ("hit_r2", "copy score r=2")),
)


SELF_KEYS = ("self_target", "self_target_pose")


def correspondence_truth(items: list[dict], q_hw, kv_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's true source: the mannequin's correspondence, sampled at the block's map."""
    from attnbench.tasks.hit_rate import correspondence_points

    return correspondence_points(torch.stack([it["correspondence"] for it in items]), q_hw, kv_hw)


class PoseTask(Task):
    """Pose morphing: (M1, B1, B2) -> M2, with L_per + L_self + L_GAN."""

    name = "pose"
    Config = PoseConfig
    table = TABLE
    batch_keys = PAIR_KEYS + SELF_KEYS

    def __init__(self, case) -> None:
        super().__init__(case)
        self.weights = case.task_config
        # Only the mannequin knows where each target pixel comes from.
        self.truth = correspondence_truth if case.data.source == "mannequin" else None
        self.discriminator = None

    @classmethod
    def check(cls, suite, file: str) -> list[str]:
        """Pose pairs exist in the data; some loss weight is not 0."""
        problems = []
        data = suite.data
        if data.source == "folder":
            problems.append(
                f"{file}: data.source: 'folder' has no poses to morph between (allowed for task "
                "pose: mannequin, deepfashion with data.pairs)"
            )
        if data.source == "deepfashion":
            for key in ("pairs", "test_pairs"):
                if getattr(data, key) is None:
                    problems.append(f"{file}: data.{key}: required for task pose with DeepFashion")
        weights = suite.pose or PoseConfig()
        if not (weights.perceptual or weights.self or weights.gan):
            problems.append(f"{file}: pose: every loss weight is 0 (allowed: at least one > 0)")
        return problems

    def datasets(self, size):
        from attnbench.data import PosePairDataset

        data = self.case.data
        return (
            PosePairDataset(
                make_source(data, size), data.train_size, seed=self.case.seed, **pair_options(data)
            ),
            PosePairDataset(
                make_source(data, size, held_out=True),
                data.test_size,
                seed=TEST_SEED,
                **pair_options(data),
            ),
        )

    def setup(self, model, loss_fn) -> None:
        from attnbench.generators import Discriminator

        self.loss_fn = loss_fn
        gan = self.weights.discriminator
        if not self.weights.gan:
            return
        config = model.config
        self.discriminator = Discriminator(
            config.image_size, config.pose_channels, gan.channels, config.image_channels
        ).to(self.device)
        # Lazy regularisation (StyleGAN2): R1 every k steps, Adam's rate and betas to the k/(k+1).
        ratio = gan.r1_every / (gan.r1_every + 1) if gan.r1_gamma else 1.0
        self.d_optimiser = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=gan.lr * ratio,
            betas=tuple(b**ratio for b in gan.betas),
        )

    def generator_loss(self, net, batch: dict, step: int) -> torch.Tensor:
        n = len(batch["source"])
        # The pose pair and the self-supervision pair in one forward (and one DDP backward).
        out = net(
            batch["source"].repeat(2, 1, 1, 1),
            batch["source_pose"].repeat(2, 1, 1, 1),
            torch.cat([batch["target_pose"], batch["self_target_pose"]]),
        )
        fake, self_out = out[:n], out[n:]
        w = self.weights
        loss = out.new_zeros(())
        if w.perceptual:
            loss = loss + w.perceptual * self.loss_fn(fake, batch["target"])
        if w.self:
            loss = loss + w.self * self.loss_fn(self_out, batch["self_target"])
        if self.discriminator is not None:
            self.discriminator_step(fake.detach(), batch, step)
            self.discriminator.requires_grad_(False)
            logits = self.discriminator(fake, batch["target_pose"])
            self.discriminator.requires_grad_(True)
            loss = loss + w.gan * F.softplus(-logits).mean()
        return loss

    def discriminator_step(self, fake: torch.Tensor, batch: dict, step: int) -> None:
        """One update: non-saturating logistic loss, plus the lazy R1 penalty on its steps."""
        gan = self.weights.discriminator
        r1 = gan.r1_gamma > 0 and step % gan.r1_every == 0
        real = batch["source"].detach().requires_grad_(r1)
        real_logits = self.discriminator(real, batch["source_pose"])
        fake_logits = self.discriminator(fake, batch["target_pose"])
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        if r1:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = grad.square().sum(dim=(1, 2, 3)).mean()
            loss = loss + gan.r1_gamma / 2 * penalty * gan.r1_every
        self.d_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.discriminator)
        self.d_optimiser.step()

    def networks(self):
        return {} if self.discriminator is None else {"discriminator": self.discriminator}

    def state_dict(self) -> dict:
        if self.discriminator is None:
            return {}
        return {
            "discriminator": self.discriminator.state_dict(),
            "d_optimiser": self.d_optimiser.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimiser.load_state_dict(state["d_optimiser"])

    def metrics(self, pred, target):
        from attnbench.metrics import FID_BIAS_SAMPLES, MetricUnavailable, fid

        try:
            value = fid(pred, target, batch=self.case.evaluation.eval_batch, device=self.device)
        except MetricUnavailable as err:
            return {"fid": None, "fid_samples": None}, [f"fid: {err}"]
        notes = []
        if len(pred) < FID_BIAS_SAMPLES:
            notes.append(
                f"fid: from {len(pred)} images, biased upwards below {FID_BIAS_SAMPLES}: compare "
                "values of one sample count only"
            )
        return {"fid": value, "fid_samples": len(pred)}, notes

    def save_grid(self, path: Path, batch: dict, output: torch.Tensor) -> None:
        """One row per sample: M1, B1, B2, output, M2 (the paper's Fig. 6)."""
        write_grid(
            path,
            [
                batch["source"],
                pose_picture(batch["source_pose"][:, :NUM_KEYPOINTS]),
                pose_picture(batch["target_pose"][:, :NUM_KEYPOINTS]),
                output,
                batch["target"],
            ],
        )
