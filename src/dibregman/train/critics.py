"""The critic heads (option ``critic_head``): what estimates ``log r`` for the generator's weights. Each is a
builder ``(teacher, base, fake_score, cfg) -> nn.Module`` registered in ``CRITIC_HEADS``; ``base`` is the
network both students start from. Register your own to make ``critic_head = <name>`` a valid option."""

from __future__ import annotations

import copy

from torch import nn

from ..nets import feature_width
from ..nets.mlp import MLP
from ..precond import Precond
from ..ratio import Critic, FeatureCritic, feature_head
from ..registry import Registry
from ..teachers import Teacher
from .config import ConfigError, DistillConfig

CRITIC_HEADS = Registry("critic head")


def _features(base: Precond) -> tuple[bool, int]:
    """``(spatial, width)`` of the features of ``base``'s backbone (spatial: an image backbone, ours or a diffusers
    one); a config error for a backbone without features."""
    width = feature_width(base.backbone)
    if width is None:
        raise ConfigError(f"a critic head reads the network's features, and its {type(base.backbone).__name__} "
                          "backbone has none (features with feature_channels or hidden): use a divergence without "
                          "a critic (reverse_kl) or a backbone with features")
    return width


@CRITIC_HEADS.register("fake_score", help="a head on the fake score's bottleneck features")
def fake_score_head(teacher: Teacher, base: Precond, fake_score: Precond, cfg: DistillConfig) -> nn.Module:
    spatial, channels = _features(base)
    return FeatureCritic(fake_score, feature_head(channels, spatial))


@CRITIC_HEADS.register("teacher", help="a head on the frozen teacher's bottleneck features")
def teacher_head(teacher: Teacher, base: Precond, fake_score: Precond, cfg: DistillConfig) -> nn.Module:
    if teacher.network is None:
        raise ConfigError("critic_head = 'teacher' needs a teacher with a network; an analytic teacher has "
                          "none: use critic_head = fake_score or standalone")
    spatial, channels = _features(base)
    return FeatureCritic(teacher.network, feature_head(channels, spatial))


@CRITIC_HEADS.register("standalone", help="its own network: an MLP on points, a trainable copy of the teacher's "
                       "encoder with a head on images")
def standalone_head(teacher: Teacher, base: Precond, fake_score: Precond, cfg: DistillConfig) -> nn.Module:
    spatial, channels = _features(base)
    if not spatial:
        return Critic(MLP(teacher.shape[0], cfg.hidden, cfg.depth, out_dim=1), teacher.sigma_data)
    return FeatureCritic(copy.deepcopy(base).requires_grad_(True), feature_head(channels, True), train_encoder=True)
