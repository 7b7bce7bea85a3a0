"""Counterfactual explanations of FR decisions (issue 7): attribute significance s_a and the decoder as a defence.

Plain functions over tensors and arrays: :mod:`facexplain.counterfactual.explain` (Ren et al. §III-D:
s_a per attribute, its ranking, the LBP patch significance map and the agreement of two attack
families) and :mod:`facexplain.counterfactual.defence` (DFD §4.3.3 / Fig. 13: verification ROC of
attacked pairs with and without decoding the attacked template first). The attacks themselves live in
:mod:`facexplain.attacks`.
"""

from facexplain.counterfactual.defence import (
    DefenceSummary,
    RocCurve,
    decode_and_reembed,
    defence_summary,
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
    "DefenceSummary",
    "Explanation",
    "RocCurve",
    "Significance",
    "TopKOverlap",
    "attribute_significance",
    "decode_and_reembed",
    "defence_summary",
    "explain_counterfactual",
    "heatmap_png",
    "heatmap_rgb",
    "lbp_significance_map",
    "rank_significance",
    "roc_curve",
    "significance_ratio",
    "topk_overlap",
]
