"""benchmarks/correctness.py's pure parts: the live-count gap analysis and the one-shot
comparison (the engine run itself needs a GPU)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from correctness import gap_analysis, vs_one_shot  # noqa: E402


def test_gap_analysis_classifies_rows_by_their_causes():
    # 3 layers, 4 old keys, 2 heads; fp32 logits and their bf16 recompute
    l32 = torch.full((3, 4, 2), 1.0)
    l16 = l32.clone()
    l32[0, 1, 0], l16[0, 1, 0] = 0.01, -0.02  # near: bf16 crosses 0
    l32[2, 3, 1], l16[2, 3, 1] = 0.5, 0.45    # far: bf16 moves 0.05 of a 0.5 margin
    fl = l32 > 0
    fl[0, 1, 0] = False  # the engine decided the other way at both
    fl[2, 3, 1] = False
    bad = [[0, 0], [1, 1], [2, 1]]  # rows whose live counts differ
    g = gap_analysis([l32], [l16], [fl], [bad])
    assert g["decisions_differing"] == 2 and g["decisions_near_threshold"] == 1
    assert g["rows_mismatched"] == 3
    # (0,0) and (1,1) have only the near flip at or below them; (2,1) also has the far one
    assert g["rows_explained"] == 2 and g["rows_without_cause"] == 0
    assert abs(g["explained_fraction"] - 2 / 3) < 1e-12
    assert g["decisions_judged"] == 24 and g["near_threshold_all"] == 1
    assert {(e["layer"], e["key"], e["head"]) for e in g["examples"]} == {(0, 1, 0), (2, 3, 1)}
    # farthest first: the far flip's margin is 0.5 / 0.05 = 10, the near one's 0.01 / 0.03
    far = g["farthest"]
    assert [(e["layer"], e["key"], e["head"]) for e in far] == [(2, 3, 1), (0, 1, 0)]
    assert abs(far[0]["margin"] - 10.0) < 1e-4 and far[1]["margin"] < 1
    assert g["margin_histogram"] == {"<=1": 1, "1-2": 0, "2-4": 0, "4-8": 0, ">8": 1}
    # lane (2, :, 1) moves at most 0.05 under bf16: the far flip is beyond its reach too
    assert g["decisions_within_lane_reach"] == 1 and g["rows_explained_lane_reach"] == 2
    assert abs(far[0]["lane_reach"] - 0.05) < 1e-6


def test_gap_analysis_lane_reach_explains_a_flip_its_own_recompute_missed():
    l32 = torch.full((2, 4, 1), 1.0)
    l16 = l32.clone()
    l32[1, 0, 0], l16[1, 0, 0] = 0.8, -0.9  # this lane's bf16 recompute moves 1.7 at key 0
    l32[1, 2, 0], l16[1, 2, 0] = 0.5, 0.49  # so a flip of a 0.5 logit is within its reach
    fl = l32 > 0
    fl[1, 2, 0] = False
    g = gap_analysis([l32], [l16], [fl], [[[1, 0]]])
    assert g["rows_explained"] == 0 and g["rows_explained_lane_reach"] == 1
    assert g["decisions_within_lane_reach"] == 1 and g["explained_fraction_lane_reach"] == 1.0


def test_gap_analysis_flags_a_mismatch_without_any_differing_decision():
    l32 = torch.ones(2, 3, 1)
    g = gap_analysis([l32], [l32.clone()], [l32 > 0], [[[1, 0]]])
    assert g["rows_without_cause"] == 1 and g["explained_fraction"] == 0.0


def test_vs_one_shot_counts_tokens_and_live_cells():
    base = dict(model="one", per_prompt=[dict(prompt_tokens=5, tokens=[1, 2, 3, 4],
                                              live=[[3, 3], [4, 4]])])
    same = dict(per_prompt=[dict(prompt_tokens=5, tokens=[1, 2, 3, 4], live=[[3, 3], [4, 4]])])
    other = dict(per_prompt=[dict(prompt_tokens=5, tokens=[1, 2, 9, 9], live=[[3, 2], [4, 4]])])
    r = vs_one_shot(same, base)
    assert r["tokens_identical_vs_one_shot"] and r["live_identical_vs_one_shot"]
    r = vs_one_shot(other, base)
    assert r["token_match_vs_one_shot"] == 0.5 and r["live_match_vs_one_shot"] == 0.75
    assert not r["tokens_identical_vs_one_shot"] and r["one_shot_row"] == "one"


def test_gap_analysis_judges_a_saturated_logit_by_the_lane_before_q_norm():
    # q_norm over a head holding only the lane: every logit is +-1131, whatever the lane's size
    l32 = torch.tensor([[[1131.0], [-1131.0]]])
    l16 = l32.clone()
    fl = torch.tensor([[[True], [True]]])  # the engine evicted key 1 as well
    pre32 = torch.tensor([[[0.8], [-0.002]]])
    pre16 = torch.tensor([[[0.8], [0.001]]])  # bf16 moves that lane across 0 before the norm
    g = gap_analysis([l32], [l16], [fl], [[[0, 0]]], [pre32], [pre16])
    assert g["decisions_near_threshold"] == 0 and g["rows_explained"] == 0
    assert g["decisions_near_prenorm"] == 1 and g["explained_fraction_prenorm"] == 1.0
    assert abs(g["farthest"][0]["margin_prenorm"] - 2 / 3) < 1e-5
    # without the lanes before the norm, the logit margin is all there is
    g = gap_analysis([l32], [l16], [fl], [[[0, 0]]])
    assert g["decisions_near_prenorm"] == 0 and g["rows_explained_prenorm"] == 0
