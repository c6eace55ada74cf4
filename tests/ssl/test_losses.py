"""Hand-computed checks of the DINOv2 losses and teacher centering (arXiv 2304.07193)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from foundation.ssl.losses import DINOClsLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from foundation.ssl.losses.centering import SoftmaxCenter

T_S = 0.1  # student temperature


def ce(a: float, t0: float) -> float:
    """H(t, s) for K=2, student logits [a*T_S, 0], teacher [t0, 1-t0]: log(1 + e^a) - t0*a."""
    return math.log(1.0 + math.exp(a)) - t0 * a


def student(*a: float) -> torch.Tensor:
    return torch.tensor([[x * T_S, 0.0] for x in a])


def teacher(*t0: float) -> torch.Tensor:
    return torch.tensor([[x, 1.0 - x] for x in t0])


# ---------------------------------------------------------------- DINO [CLS] loss
def test_dino_single_pair_hand_value() -> None:
    loss = DINOClsLoss()([student(1.0)], [teacher(0.25)])
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 0.25, abs=1e-6)


def test_dino_batch_mean() -> None:
    loss = DINOClsLoss()([student(1.0, 2.0)], [teacher(0.25, 0.5)])
    assert loss.item() == pytest.approx((ce(1.0, 0.25) + ce(2.0, 0.5)) / 2, abs=1e-6)


def test_dino_pairs_and_skip_same_index() -> None:
    s = [student(1.0), student(2.0), student(3.0)]  # two globals + one local
    t = [teacher(0.25), teacher(0.5)]
    all_pairs = sum(ce(a, t0) for a in (1.0, 2.0, 3.0) for t0 in (0.25, 0.5)) / 6
    skipped = (ce(1.0, 0.5) + ce(2.0, 0.25) + ce(3.0, 0.25) + ce(3.0, 0.5)) / 4  # 3*2 - 2 pairs
    assert DINOClsLoss()(s, t).item() == pytest.approx(all_pairs, abs=1e-6)
    assert DINOClsLoss()(s, t, skip_same_index=True).item() == pytest.approx(skipped, abs=1e-6)


def test_dino_grad_and_bad_input() -> None:
    s = student(1.0).requires_grad_()
    DINOClsLoss()([s.half()], [teacher(0.25)]).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="no .* pair"):
        DINOClsLoss()([student(1.0)], [teacher(0.25)], skip_same_index=True)
    with pytest.raises(ValueError, match="student_temp"):
        DINOClsLoss(student_temp=0.0)
    with pytest.raises(ValueError, match="shape"):
        DINOClsLoss()([student(1.0, 2.0)], [teacher(0.25)])


# ---------------------------------------------------------------- iBOT patch loss
def test_ibot_per_image_weighting() -> None:
    masks = torch.tensor(
        [
            [False, True, False, False],  # image 0: 1 masked patch
            [True, True, False, True],  # image 1: 3 masked patches
            [False, False, False, False],  # image 2: none, still counts in N
        ]
    )
    a, t0 = [1.0, 2.0, -1.0, 0.5], [0.25, 0.5, 0.9, 0.1]
    ces = [ce(x, y) for x, y in zip(a, t0, strict=True)]
    expected = (ces[0] / 1 + (ces[1] + ces[2] + ces[3]) / 3) / 3
    loss = IBOTPatchLoss()(student(*a), teacher(*t0), masks)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ibot_no_masked_patch_is_zero_with_graph() -> None:
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = IBOTPatchLoss()(logits, torch.zeros(0, 5), torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_ibot_rejects_count_mismatch() -> None:
    masks = torch.tensor([[True, True], [True, False]])
    with pytest.raises(ValueError, match="select 3"):
        IBOTPatchLoss()(student(1.0, 2.0), teacher(0.5, 0.5), masks)
    with pytest.raises(ValueError, match="bool"):
        IBOTPatchLoss()(student(1.0), teacher(0.5), torch.ones(1, 1))


# ---------------------------------------------------------------- KoLeo
def test_koleo_three_points_hand_value() -> None:
    # Directions 0, 60 and 180 degrees (norms 2, 3, 0.5): nearest-neighbour distances 1, 1, sqrt(3).
    x = torch.tensor([[2.0, 0.0], [1.5, 1.5 * math.sqrt(3)], [-0.5, 0.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-5)


def test_koleo_two_samples() -> None:
    loss = KoLeoLoss()(torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    assert loss.item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    "x", [[[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]], [[0.3, 0.4, 0.5]] * 4, [[1.0, 1.0], [1.0, 1.0]]]
)
def test_koleo_duplicates_finite(x: list[list[float]]) -> None:
    feats = torch.tensor(x, requires_grad=True)
    loss = KoLeoLoss()(feats)
    loss.backward()
    assert torch.isfinite(loss) and feats.grad is not None and torch.isfinite(feats.grad).all()


def test_koleo_rejects_bad_batch() -> None:
    with pytest.raises(ValueError, match="B=1"):
        KoLeoLoss()(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        KoLeoLoss()(torch.ones(4))


# ---------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_one_iteration_hand_value() -> None:
    # exp(logits) = [[1, 2], [3, 4]] -> Q = [[.1, .3], [.2, .4]] -> rows [.125, .375], [1/6, 1/3]
    # -> columns normalised, times B: [[3/7, 4/7], [9/17, 8/17]].
    logits = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    q = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=1)
    torch.testing.assert_close(q, torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]))


def test_sinkhorn_marginals_converge() -> None:
    b, k = 8, 4
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b))
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), b / k), atol=1e-3, rtol=0)


def test_sinkhorn_default_is_row_stochastic_float32() -> None:
    cosines = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logits = (cosines + 100).to(torch.bfloat16)  # exp(100 / 0.04) would overflow without a shift
    q = sinkhorn_knopp(logits.requires_grad_(), teacher_temp=0.04)
    assert q.dtype == torch.float32 and not q.requires_grad
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(6))
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(4, 3), 0.1), torch.full((4, 3), 1 / 3))


def test_sinkhorn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.1, n_iterations=0)


# ---------------------------------------------------------------- softmax centering
def test_softmax_center_update_and_forward() -> None:
    center = SoftmaxCenter(2, momentum=0.9)
    center.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # the first batch sets c to its mean [2, 3]
    torch.testing.assert_close(center.center, torch.tensor([[2.0, 3.0]]))
    center.update(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # then EMA: 0.9 [2, 3] + 0.1 [0, 1]
    torch.testing.assert_close(center.center, torch.tensor([[1.8, 2.8]]))
    # (l - c) / T = ([1, 0.5] - [1.8, 2.8]) / 0.5 = [-1.6, -4.6]
    p = center(torch.tensor([[1.0, 0.5]]), teacher_temp=0.5)
    p0 = 1 / (1 + math.exp(-4.6 + 1.6))
    torch.testing.assert_close(p, torch.tensor([[p0, 1 - p0]]))
    assert int(center.updates) == 2


def test_softmax_center_starts_from_the_first_batch() -> None:
    """Before any update the targets are centred by the batch's own mean, not by zero: a shared component of
    the teacher's scores (every image alike at initialisation) must not give every image the same target."""
    shared = torch.tensor([5.0, 0.0, 0.0])
    logits = shared + torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    p = SoftmaxCenter(3, momentum=0.9)(logits, teacher_temp=0.1)
    assert torch.equal(p.argmax(dim=1), torch.tensor([0, 1, 2]))  # zero-centred: all three pick prototype 0
    torch.testing.assert_close(p, torch.softmax((logits - logits.mean(0)) / 0.1, dim=1))


def test_softmax_center_loads_a_checkpoint_without_the_update_count() -> None:
    state = {"center": torch.tensor([[1.0, 2.0]])}  # written before the count existed: a trained center
    center = SoftmaxCenter(2, momentum=0.5)
    center.load_state_dict(state)
    assert int(center.updates) == 1
    center.update(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(center.center, torch.tensor([[2.0, 3.0]]))  # EMA, not re-initialised
    fresh = SoftmaxCenter(2, momentum=0.5)
    fresh.load_state_dict(center.state_dict())
    torch.testing.assert_close(fresh(torch.zeros(1, 2), 1.0), center(torch.zeros(1, 2), 1.0))


def test_softmax_center_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(2, momentum=1.5)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        SoftmaxCenter(2).update(torch.zeros(3, 4))


# ---------------------------------------------------------------- distributed (2 gloo ranks on CPU)
def _dist_worker(rank: int, init_file: str, logits: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = logits[:1] if rank == 0 else logits[1:]  # unequal shards: 1 and 3 rows
        q = sinkhorn_knopp(shard, teacher_temp=0.5, n_iterations=3)
        center = SoftmaxCenter(logits.shape[1], momentum=0.5)
        center.update(shard)
        out[rank] = (q, center.center.clone())
    finally:
        dist.destroy_process_group()


def test_distributed_matches_global_batch(tmp_path) -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_dist_worker, args=(str(tmp_path / "store"), logits, out), nprocs=2)
        results = dict(out)
    expected_q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), expected_q)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][1], logits.mean(dim=0, keepdim=True))
