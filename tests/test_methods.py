"""The methods as published (issue #14), checked against independent references: AlignProp's truncation draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewardtune.errors import UserError
from rewardtune.finetune.sampler import make_plan
from rewardtune.plan.memory import _plan_config

# ----- AlignProp ------------------------------------------------------------------------------------------------

# The chi-square statistic's 0.999 quantile for 9 and 4 degrees of freedom (tables): a uniform draw exceeds it
# one time in a thousand; a Gaussian draw like AlignProp's 2024 default (mean 8, std 5, kept in 1..10) exceeded
# it in 200 of 200 simulated runs of 2000 (the smallest statistic 75.8).
CHI2_999 = {9: 27.877, 4: 18.467}


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("k_min,k", [(1, 10), (3, 7)])
def test_alignprop_draws_k_uniformly_from_k_min_to_k(per_sample, k_min, k):
    """Over 2000 batches (one generator per step, as the trainer seeds them) every K in k_min..k appears, none
    outside, the counts pass a chi-square test of uniformity, and the batch shares one K unless per_sample."""
    n_steps, batch = 10, 3
    plans = [
        make_plan(
            "alignprop", n_steps, batch, torch.Generator().manual_seed(s), k=k, k_min=k_min, per_sample=per_sample
        )
        for s in range(2000)
    ]
    assert all(p.stop == n_steps and len(p.grad_from) == batch for p in plans)
    if per_sample:
        ks = [n_steps - g for p in plans for g in p.grad_from]
        assert sum(len(set(p.grad_from)) > 1 for p in plans) > 1000  # samples of a batch draw their own K
    else:
        assert all(len(set(p.grad_from)) == 1 for p in plans)
        ks = [n_steps - p.grad_from[0] for p in plans]
    counts = np.bincount(ks, minlength=n_steps + 1)
    assert counts[:k_min].sum() == 0 and counts[k + 1 :].sum() == 0
    observed = counts[k_min : k + 1]
    assert (observed > 0).all()
    expected = len(ks) / len(observed)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[len(observed) - 1], (observed.tolist(), chi2)


def test_alignprop_k_defaults_to_all_steps_and_draft_k_to_one(sd_model, tmp_path, tiny_cfg):
    def cfg(**kw):
        return tiny_cfg(sd_model, tmp_path, **{"k": None, **kw})

    assert cfg(method="alignprop", sample_steps=6).validate().k == 6
    assert cfg(method="draft-k", sample_steps=6).validate().k == 1
    assert cfg(method="alignprop", sample_steps=6, k=4, k_min=2).validate().k == 4
    with pytest.raises(UserError, match="--k-min applies to --method alignprop only"):
        cfg(method="draft-k", k_min=2).validate()
    with pytest.raises(UserError, match="--k-min 5 is more than --k 4"):
        cfg(method="alignprop", sample_steps=6, k=4, k_min=5).validate()
    # the planner traces AlignProp's worst case, K = all steps, once the model's steps are known
    unresolved = cfg(method="alignprop", sample_steps=None).validate()
    assert unresolved.k is None and _plan_config(unresolved).method == "alignprop"
    unresolved.sample_steps = 50  # what resolve_defaults fills in for an SD model
    traced = _plan_config(unresolved.validate())
    assert (traced.method, traced.k, traced.sample_steps) == ("draft-k", 50, 50)
