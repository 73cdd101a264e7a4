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

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from attnbench.data.pose import NUM_KEYPOINTS
from attnbench.tasks.training import (
    PAIR_KEYS,
    TEST_SEED,
    Task,
    average_gradients,
    make_source,
    pose_picture,
    write_grid,
)

SELF_KEYS = ("self_target", "self_target_pose")


def correspondence_truth(items: list[dict], q_hw, kv_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's true source: the mannequin's correspondence, sampled at the block's map."""
    from attnbench.tasks.hit_rate import correspondence_points

    return correspondence_points(torch.stack([it["correspondence"] for it in items]), q_hw, kv_hw)


class PoseTask(Task):
    """Pose morphing: (M1, B1, B2) -> M2, with L_per + L_self + L_GAN."""

    name = "pose"
    batch_keys = PAIR_KEYS + SELF_KEYS

    def __init__(self, case, suite, device) -> None:
        from attnbench.suite import PoseConfig

        super().__init__(case, suite, device)
        self.weights = PoseConfig(**json.loads(case.task_config))
        # Only the mannequin knows where each target pixel comes from.
        self.truth = correspondence_truth if suite.data.source == "mannequin" else None
        self.discriminator = None

    def datasets(self, size):
        from attnbench.data import PosePairDataset

        data = self.suite.data
        pairs = {"sigma": data.sigma, "noise": data.noise, "coords": data.pose == "heatmaps+coords"}
        return (
            PosePairDataset(
                make_source(self.suite, size), data.train_size, seed=self.case.seed, **pairs
            ),
            PosePairDataset(
                make_source(self.suite, size, held_out=True),
                data.test_size,
                seed=TEST_SEED,
                **pairs,
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
            value = fid(pred, target, batch=self.suite.eval_batch, device=self.device)
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
