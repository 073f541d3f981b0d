"""The weighted reciprocal-rank fusion of the vector and full-text candidates (answers and search)."""

import pytest

from pgsynapse.retrieval import RRF_K, rrf


def test_equal_weights_fuse_both_rankings_and_keep_the_first_order_on_ties():
    # 2 is second in both rankings, so it beats 1 and 3, which each lead one ranking and are missing from the other
    assert rrf([[1, 2], [3, 2]]) == [2, 1, 3]
    assert rrf([[1, 2, 3]]) == [1, 2, 3]


def test_a_zero_weight_leaves_the_first_ranking_and_appends_the_others_hits():
    assert rrf([[1, 2, 3], [3, 4]], [1.0, 0.0]) == [1, 2, 3, 4]


def test_the_text_weight_decides_whether_a_full_text_only_hit_outranks_a_vector_one():
    vector, text = [1, 2, 3], [9]
    # 9 (text rank 1) against 2 (vector rank 2): w / (k + 1) against 1 / (k + 2)
    assert rrf([vector, text], [1.0, 1.0]).index(9) < rrf([vector, text], [1.0, 1.0]).index(2)
    w = (RRF_K + 1) / (RRF_K + 2) - 0.01  # just under the break-even weight
    assert rrf([vector, text], [1.0, w]).index(9) > rrf([vector, text], [1.0, w]).index(2)


def test_the_number_of_weights_must_match_the_rankings():
    with pytest.raises(ValueError):
        rrf([[1], [2]], [1.0])
