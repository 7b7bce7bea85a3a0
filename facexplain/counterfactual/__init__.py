"""Counterfactual explanations of FR decisions (issue 7): attribute significance s_a and the decoder as a defence.

Plain functions over tensors and arrays: :mod:`facexplain.counterfactual.explain` (Ren et al. §III-D:
s_a per attribute, its ranking, the LBP patch significance map and the agreement of two attack
families) and :mod:`facexplain.counterfactual.defence` (DFD §4.3.3 / Fig. 13: verification ROC of
attacked pairs with and without decoding the attacked template first), composed per pair by
:mod:`facexplain.counterfactual.attack` (attack a pair in the probe's pixel grid, then explain it).
The attacks themselves live in :mod:`facexplain.attacks`.
"""

from facexplain.counterfactual.attack import (
    Align,
    ExplainedAttack,
    FacePair,
    PairAttack,
    ScoringModel,
    attack_and_explain,
    attack_pair,
    fixed_landmark_aligner,
    pipeline_aligner,
    pipeline_scoring_model,
    random_controls,
)
from facexplain.counterfactual.defence import (
    DefencePair,
    DefenceSummary,
    RocCurve,
    decode_and_reembed,
    defence_pair,
    defence_report,
    defence_summary,
    defended_scores,
    roc_curve,
)
from facexplain.counterfactual.explain import (
    Explanation,
    Significance,
    TopKOverlap,
    attribute_significance,
    explain_counterfactual,
    heatmap_png,
    heatmap_rgb,
    lbp_significance_map,
    rank_significance,
    significance_ratio,
    topk_overlap,
)

__all__ = [
    "Align",
    "DefencePair",
    "DefenceSummary",
    "ExplainedAttack",
    "Explanation",
    "FacePair",
    "PairAttack",
    "RocCurve",
    "ScoringModel",
    "Significance",
    "TopKOverlap",
    "attack_and_explain",
    "attack_pair",
    "attribute_significance",
    "decode_and_reembed",
    "defence_pair",
    "defence_report",
    "defence_summary",
    "defended_scores",
    "explain_counterfactual",
    "fixed_landmark_aligner",
    "heatmap_png",
    "heatmap_rgb",
    "lbp_significance_map",
    "pipeline_aligner",
    "pipeline_scoring_model",
    "random_controls",
    "rank_significance",
    "roc_curve",
    "significance_ratio",
    "topk_overlap",
]
