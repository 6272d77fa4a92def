"""Improved precision / recall (Kynkaanniemi et al. 2019) on cases computable by hand."""
import numpy as np
import pytest

from ecgflowcmr.metrics.manifold import coverage_of, knn_radii, precision_recall, precision_recall_by_frame


def test_knn_radii_on_a_line():
    # points 0, 1, 2, 3, 10 on a line; k = 1: nearest other point; k = 3: third nearest
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert np.allclose(knn_radii(x, k=1), [1, 1, 1, 1, 7])
    assert np.allclose(knn_radii(x, k=3), [3, 2, 2, 3, 9])


def test_coverage_uses_the_manifold_points_radii():
    manifold = np.array([[0.0, 0.0], [10.0, 0.0]])
    radii = np.array([1.0, 3.0])
    queries = np.array([[0.5, 0.0], [1.5, 0.0], [12.9, 0.0], [13.1, 0.0], [0.0, 1.0]])
    assert coverage_of(manifold, radii, queries).tolist() == [True, False, True, False, True]


def test_identical_sets_score_one():
    x = np.random.default_rng(0).normal(size=(50, 4))
    res = precision_recall(x, x.copy(), k=3)
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and (res["n_real"], res["n_fake"]) == (50, 50)


def test_mode_collapse_keeps_precision_and_loses_recall():
    # real: a cluster at 0 and one at 100 (4 points each); fake: 4 points of the first cluster only
    real = np.array([[0.0], [1.0], [2.0], [3.0], [100.0], [101.0], [102.0], [103.0]])
    fake = np.array([[0.5], [1.5], [2.5], [1.0]])
    res = precision_recall(real, fake, k=3)
    # every fake point lies within the first real cluster's balls (radius >= 2)
    assert res["precision"] == 1.0
    # fake radii (k = 3 within the fake set): 0.5 -> 2.0, 1.5 -> 1.0, 2.5 -> 2.0, 1.0 -> 1.5;
    # real 0..3 are covered, the far cluster is not: recall = 4 / 8
    assert res["recall"] == pytest.approx(0.5)


def test_far_fakes_have_no_precision():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[50.0], [51.0], [52.0], [53.0]])
    res = precision_recall(real, fake, k=3)
    assert res["precision"] == 0.0 and res["recall"] == 0.0


def test_block_size_does_not_change_the_result():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(37, 3)), rng.normal(0.5, 1.0, size=(29, 3))
    r1 = knn_radii(a, 3, block=5)
    assert np.allclose(r1, knn_radii(a, 3, block=1000))
    assert (coverage_of(a, r1, b, block=4) == coverage_of(a, r1, b, block=1000)).all()


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(np.zeros((3, 2)), k=3)


def test_frames_of_one_video_do_not_shrink_the_balls():
    """Subjects spread on a line, each video's 4 frames within 1e-3 of its subject: pooled, a frame's
    3 nearest neighbours are its own video's frames and an unseen subject of the same spread is inside
    almost no ball; one frame per video it is inside as often as for frames of the real subjects."""
    rng = np.random.default_rng(0)
    def videos(n):
        centre = rng.normal(size=(n, 1, 2))
        return centre + rng.normal(scale=1e-3, size=(n, 4, 2))
    real, fake = videos(200), videos(200)
    pooled = precision_recall(real.reshape(-1, 2), fake.reshape(-1, 2))
    by_frame = precision_recall_by_frame(real, fake)
    assert pooled["precision"] < 0.2 and pooled["recall"] < 0.2
    assert by_frame["precision"] > 0.8 and by_frame["recall"] > 0.8 and by_frame["frames"] == 4
    # one frame per video is the pooled rule applied at each frame position, then averaged
    per = [precision_recall(real[:, j], fake[:, j]) for j in range(4)]
    assert by_frame["precision"] == pytest.approx(np.mean([p["precision"] for p in per]))
    with pytest.raises(ValueError, match="frames"):
        precision_recall_by_frame(real[:, :3], fake)
