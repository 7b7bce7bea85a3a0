"""The audit's report: REPORT_DIR/audit.json (every number) and REPORT_DIR/index.html (for people).

index.html is self-contained: plain HTML and inline CSS, no scripts, no external URLs; its images are
the PNG files the audit wrote alongside it (``images/``, ``importance/``), referenced by relative path,
so the folder can be zipped, mailed or served as it is.

audit.json is reproducible: two runs with the same seed on the same services and data are identical
once :func:`strip_timestamps` has removed the timestamps (``*_at``, ``started``, ``finished``); the
direction-set ids are derived from the sets' content, so they repeat too.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from facexplain.artifacts.decoder import KIND_DECODER

RUN_SCOPED = ("started", "finished")
SECTIONS = (
    "models",
    "reconstructions",
    "ssi",
    "labels",
    "importance",
    "mirror",
    "counterfactuals",
    "occlusion",
    "aggregation",
    "privacy",
)


def is_run_scoped(key: str) -> bool:
    return key.endswith("_at") or key in RUN_SCOPED


def strip_timestamps(d: Any) -> Any:
    """A copy of ``d`` without the keys whose values differ between two runs with the same seed."""
    if isinstance(d, dict):
        return {k: strip_timestamps(v) for k, v in d.items() if not is_run_scoped(str(k))}
    if isinstance(d, list):
        return [strip_timestamps(v) for v in d]
    return d


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"
    return _e(x)


def _ref(m: dict[str, Any] | None) -> str:
    if not m or not m.get("name"):
        return "none"
    alias = f" @{m['alias']}" if m.get("alias") else ""
    return f"{_e(m['name'])} v{_e(m['version'])}{_e(alias)}"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(src: str, alt: str, cls: str = "") -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}" class="{cls}">'


def _duration(sec: dict[str, Any]) -> str:
    try:
        t = datetime.fromisoformat(sec["finished"]) - datetime.fromisoformat(sec["started"])
    except (KeyError, TypeError, ValueError):
        return ""
    return f'<p class="muted">took {t.total_seconds():.0f} s</p>'


def _models(r: dict[str, Any]) -> str:
    sec = r["models"]
    rows = []
    services = dict(sec["services"]) | ({"judge": sec["judge"]} if sec.get("judge") else {})
    for svc, st in services.items():
        for m in st["models"]:
            rows.append(
                [
                    _e(svc),
                    _e(st["target"]),
                    _e(m["kind"]),
                    _e(m["name"]),
                    _e(m["version"]),
                    _e(m["alias"]),
                    _num(m["serving"]),
                    _e(m["device"]),
                    _e(_source(m)),
                ]
            )
    reg = {st["registry_uri"] for st in sec["services"].values()}
    return f"<p>FR model audited: <b>{_ref(sec['fr_model'])}</b>. Registry: {_e(', '.join(sorted(reg)))}.</p>" + _table(
        ["service", "target", "kind", "model", "version", "alias", "serving", "device", "source"], rows
    )


def _source(m: dict[str, Any]) -> str:
    """Where a served model's bytes come from: shipped with facexplain (which release), the registry, or
    the service itself (built-in estimators)."""
    card = m.get("card") or {}
    if card.get("shipped_from"):
        return f"shipped: {card['shipped_from']}"
    return "built in" if m.get("version") == "local" else "registry"


def _decoder_card(r: dict[str, Any]) -> dict[str, str] | None:
    """The card of the decoder the decoding service serves (what every decoded picture comes from)."""
    for m in r.get("models", {}).get("services", {}).get("decoding", {}).get("models", []):
        if m["kind"] == KIND_DECODER and m["serving"]:
            return dict(m.get("card") or {})
    return None


def _trust(r: dict[str, Any]) -> str:
    """How far to trust a decoded picture: the decoder's held-out figures and gates, said beside every one."""
    card = _decoder_card(r)
    if card is None:
        return ""
    # Prefer the sealed identities through the service (shipped decoders) over the training run's test split.
    pre, where = ("heldout", "on {} faces of {} identities that no shipped model saw, through the decoding service")
    if f"{pre}_psnr" not in card:
        pre, where = "test", "on identities it never saw (its training run's test split)"
    else:
        where = where.format(card.get("heldout_faces", "?"), card.get("heldout_identities", "?"))
    shown = [("psnr", "PSNR {} dB", 2), ("ssim", "SSIM {}", 3), ("identity_cosine", "identity cosine {}", 3)]
    shown.append(("accepted", "accepted as the same person {}", 2))
    figures = [text.format(_num(float(card[f"{pre}_{k}"]), d)) for k, text, d in shown if f"{pre}_{k}" in card]
    if "test_accepted_second" in card:  # the independent FR model's verdict on the training run's test faces
        judge = _e(card.get("second_judge", "the second FR model"))
        cos = card.get("test_identity_cosine_second")
        figures.append(
            f"judged by {judge}: identity cosine {_num(float(cos)) if cos else 'n/a'}, "
            f"accepted {_num(float(card['test_accepted_second']), 2)} (test split)"
        )
    said = ", ".join(f for f in figures if f)
    origin = f" (shipped with facexplain: {_e(card['shipped_from'])})" if card.get("shipped_from") else ""
    text = (
        f"The decoder's recorded figures {where}{origin}: {said}."
        if said
        else ("The decoder records no held-out figures: nothing says how close its pictures are to the faces.")
    )
    if card.get("gates_passed") == "false":
        failed = card.get("gates_failed", "")
        text += f" It did <b>not</b> pass its quality gates{' (' + _e(failed) + ')' if failed else ''}"
        if card.get("promotion_forced_reason"):
            text += (
                f"; {_e(card.get('promotion_forced_by', 'someone'))} put it into service anyway: "
                f"&ldquo;{_e(card['promotion_forced_reason'])}&rdquo;"
            )
        text += ". Read its pictures as rough sketches, not as what the template encodes."
        return f'<p class="warn"><b>Decoded pictures:</b> {text}</p>'
    return f'<p class="muted">Decoded pictures: {text}</p>'


def _reconstructions(r: dict[str, Any]) -> str:
    sec = r["reconstructions"]
    s = sec["summary"]
    judged = bool(sec.get("judge"))
    out = _trust(r) + (
        f"<p>{s['n']} faces decoded from their templates by {_ref(sec.get('decoder'))} "
        f"(FR model {_ref(sec.get('fr_model'))}). Mean PSNR {_num(s['psnr'], 2)} dB, SSIM {_num(s['ssim'])}, "
        f"identity cosine {_num(s['identity_cosine'])}; the FR model accepts {_num(s['same_person_rate'], 2)} "
        "of the reconstructions as the same person. Top row: aligned faces; bottom row: reconstructions.</p>"
    )
    if judged:
        no_face = f"; it found no face in {s['n_second_no_face']} of the photos" if s.get("n_second_no_face") else ""
        control = s.get("identity_cosine_second_control"), s.get("same_person_rate_second_control")
        out += (
            f"<p><b>Second judge</b> {_ref(sec['judge'])}, an independent FR model (the decoder was trained against "
            f"the audited model's features, so its verdict above is a white-box score): mean identity cosine "
            f"{_num(s.get('identity_cosine_second'))} between its templates of the decoded face and of the photo; "
            f"it accepts {_num(s.get('same_person_rate_second'), 2)} of the reconstructions as the same person "
            f"(its own rule). Control, the original's aligned chip at the decoder's size judged alike: cosine "
            f"{_num(control[0])}, accepted {_num(control[1], 2)}{no_face}.</p>"
        )
    if sec.get("grid"):
        out += _img(sec["grid"], "aligned faces above their reconstructions", "wide")
    header = ["image", "identity", "decoded", "PSNR (dB)", "SSIM", "identity cosine", "same person"]
    if judged:
        header += ["second judge: cosine", "same person", "control cosine"]
    rows = []
    for f in sec["faces"]:
        row = [
            _e(f["path"]),
            _e(f["identity"]),
            _img(f["reconstruction"], "decoded " + f["path"], "thumb") if f.get("reconstruction") else "",
            _num(f["psnr"], 2),
            _num(f["ssim"]),
            _num(f["identity_cosine"]),
            _num(f["same_person"]),
        ]
        if judged:
            row += [
                _num(f.get("identity_cosine_second")),
                _num(f.get("same_person_second")),
                _num(f.get("identity_cosine_second_control")),
            ]
        rows.append(row)
    out += _table(header, rows)
    if sec["failed"]:
        out += "<p>Not reconstructed: " + "; ".join(f"{_e(f['path'])} ({_e(f['reason'])})" for f in sec["failed"])
        out += "</p>"
    return out


def _traversal(t: dict[str, Any]) -> str:
    alphas = ", ".join(_num(a, 1) for a in t["alphas"])
    cos = ", ".join(_num(c) for c in t["cosine_to_probe"])
    return (
        f"<figure>{_img(t['strip'], 'traversal of ' + t['direction'], 'strip')}<figcaption>"
        f"{_e(t['direction'])} on {_e(t['probe'])}: alphas ({_e(t['scale'])}) {alphas}; "
        f"cosine to the probe {cos}</figcaption></figure>"
    )


def _set_summary(s: dict[str, Any]) -> str:
    metrics = ", ".join(f"{_e(k)} {_num(v)}" for k, v in s["metrics"].items())
    reg = f", registered {_ref(s['registered'])}" if s.get("registered") else ""
    return (
        f"<p><b>{_e(s['method'])} / {_e(s['target'])}</b>: {len(s['directions'])} direction(s) from "
        f"{s['n_items']} items, seed {s['seed']}, digest <code>{_e(s['sha256'][:16])}</code>{reg}. {metrics}</p>"
    )


def _ssi(r: dict[str, Any]) -> str:
    sec = r["ssi"]
    out = _trust(r) + (
        f"<p>Regions {_e(', '.join(sec['regions']))}; {sec['max_pairs']} donor pairs per region, "
        f"{sec['n_components']} components, seed {sec['seed']}. Each strip moves one face along the region's "
        "first direction.</p>"
    )
    for s in sec["sets"]:
        rows = [
            [_e(d["name"]), _num(d["eigenvalue"]), _num(d["explained_variance"]), _num(d["stddev"])]
            for d in s["directions"]
        ]
        out += _set_summary(s) + _table(["direction", "eigenvalue", "explained variance", "stddev"], rows)
        out += _traversal(s["traversal"])
    return out


def _labels(r: dict[str, Any]) -> str:
    out = _trust(r)
    for d in r["labels"]["directions"]:
        title = f"<h3>{_e(d['label'])} ({_e(d['method'])})</h3>"
        if d.get("skipped"):
            out += title + f'<p class="muted">skipped: {_e(d["skipped"])}</p>'
            continue
        out += title + _set_summary(d["set"])
        if d["set"]["centroids"]:
            rows = [[_e(c["name"]), _num(c["value"]), str(c["count"])] for c in d["set"]["centroids"]]
            out += _table(["centroid", "label value", "faces"], rows)
        out += _traversal(d["traversal"])
    return out


def _importance(r: dict[str, Any]) -> str:
    sec = r["importance"]
    out = (
        f"<p>I(a; â) in nats between each attribute on the original face and on the face decoded from its "
        f"template: FR model {_ref(sec['fr_model'])}, decoder {_ref(sec['decoder'])}, estimator "
        f"{_e(sec['estimator'])}, {sec['n_items']} faces, {sec['n_bootstrap']} subsamples "
        f"(interval {_num(sec['ci_level'], 2)}), seed {sec['seed']}. The shuffled control is what the "
        "estimator reports with the pairing destroyed (mean over the shuffles); p is the share of shuffles "
        "that reach the real value, so a large p means the attribute is not shown to survive in the template. "
        f'<a href="{_e(sec["csv"])}">CSV</a></p>'
    )
    out += _img(sec["chart"], "attribute importance chart", "wide")
    rows = [
        [
            _e(x["attribute"]),
            _e(x["group"]),
            _num(x["mi"]),
            f"{_num(x['ci_low'])} – {_num(x['ci_high'])}",
            _num(x["control_mi"]),
            _num(x["p_value"]),
            str(x["n"]),
        ]
        for x in sec["rows"]
    ]
    return out + _table(["attribute", "group", "MI", "interval", "control", "p", "n"], rows, "compact")


def _mirror(r: dict[str, Any]) -> str:
    sec = r["mirror"]
    m = sec["summary"]
    out = (
        "<p>Cosine between the template of each face and the template of its mirror image (left and right "
        "swapped, which negates head yaw and roll), beside the cosine of two photos of one person and of two "
        f"people. Reading: <b>{_e(sec['reading'])}</b>.</p>"
    )
    rows = [
        ["face vs its mirror image", str(m["n_faces"]), _num(m["mirror_cosine_mean"]), _num(m["mirror_cosine_min"])],
        ["two photos of one person", str(m["same_person_pairs"]), _num(m["same_person_cosine_mean"]), ""],
        ["two people", str(m["other_person_pairs"]), _num(m["other_person_cosine_mean"]), ""],
    ]
    return out + _table(["templates compared", "n", "mean cosine", "lowest"], rows)


def _counterfactuals(r: dict[str, Any]) -> str:
    sec = r["counterfactuals"]
    rule = sec["rule"]
    n = sec["n_pairs"]
    rates = sec["rates"]
    out = _trust(r) + (
        f"<p>{_e(sec['pairs_source'])}: {n['genuine']} genuine and {n['impostor']} impostor pairs scored "
        f"({n['skipped']} skipped); rule {_e(rule.get('metric', ''))} "
        f"{'&lt;' if rule.get('accept_below') else '&gt;'} {_num(rule.get('threshold'))}. Accepted: genuine "
        f"{_num(rates['genuine_accepted'], 2)}, impostor {_num(rates['impostor_accepted'], 2)}.</p>"
    )
    for x in sec["explanations"]:
        imgs = x["images"]
        figs = "".join(
            f"<figure>{_img(imgs[k], label, 'face')}<figcaption>{label}</figcaption></figure>"
            for k, label in (
                ("adversarial", "adversarial probe"),
                ("decoded_probe", "decoded probe"),
                ("decoded_reference", "decoded reference"),
                ("decoded_adversarial", "decoded adversarial"),
                ("lbp_map", "LBP significance"),
            )
        )
        rows = [[_e(t["attribute"]), _e(t["group"]), _num(t["s_a"]), _num(t["significant"])] for t in x["top"]]
        out += (
            f"<h3>{_e(x['kind'])}: {_e(x['a'])} vs {_e(x['b'])}</h3><p>PGD ({_e(x['goal'])}, seed {x['seed']}): "
            f"score {_num(x['score_before'])} → {_num(x['score_after'])}, decision "
            f"{'flipped' if x['flipped'] else 'not flipped'} in {x['steps_used']} steps, L∞ {_num(x['linf'], 4)}, "
            f"L2 {_num(x['l2'])}; {x['n_significant']} of {x['n_attributes']} attributes significant "
            f'(s_a &gt; 1).</p><div class="row">{figs}</div>'
            + _table(["attribute", "group", "s_a", "significant"], rows, "compact")
        )
    return out


def _occlusion(r: dict[str, Any]) -> str:
    sec = r["occlusion"]
    rule = sec.get("rule") or {}
    out = _trust(r) + (
        "<p>Each region is hidden (painted black) on the aligned face, the occluded face is embedded and its "
        f"template decoded by {_ref(sec.get('decoder'))} (FR model {_ref(sec.get('fr_model'))}; rule "
        f"{_e(rule.get('metric', ''))} at {_num(rule.get('threshold'))}). <b>Template kept</b>: cosine of the "
        "occluded face's template to the clean one's, and of the decoded occluded face to the clean face. "
        "<b>Filled in</b>: inside the hidden region, the mean |RGB| error of the decoded occluded face to the "
        "occluder and to the original face (smaller to the face: the decoder draws a face there, so the template "
        "did not record the occluder); outside it, the error to the original is the yardstick. In each grid the "
        "first column is the clean face and its decoding, then one column per region.</p>"
    )
    rows = [
        [
            _e(name),
            str(s["n"]),
            _num(s["occluded_fraction"], 2),
            _num(s["template_cosine"]),
            _num(s["template_same_person"], 2),
            _num(s["decoded_identity_cosine"]),
            _num(s["decoded_same_person"], 2),
            _num(s["inside_to_occluder"]),
            _num(s["inside_to_original"]),
            _num(s["outside_to_original"]),
            _num(s["fills_in"], 2),
        ]
        for name, s in sec["summary"].items()
    ]
    out += _table(
        [
            "region",
            "faces",
            "hidden share",
            "template cosine",
            "template accepted",
            "decoded identity cosine",
            "decoded accepted",
            "inside: error to occluder",
            "inside: error to face",
            "outside: error to face",
            "filled in",
        ],
        rows,
    )
    for f in sec["faces"]:
        out += f"<figure>{_img(f['grid'], 'occluded faces above their decodings', 'strip')}"
        out += f"<figcaption>{_e(f['path'])}: clean, then {_e(', '.join(x['region'] for x in f['regions']))}"
        out += "</figcaption></figure>"
    if sec["failed"]:
        out += "<p>Not occluded: " + "; ".join(f"{_e(f['path'])} ({_e(f['reason'])})" for f in sec["failed"])
        out += "</p>"
    return out


def _aggregation(r: dict[str, Any]) -> str:
    sec = r["aggregation"]
    if sec.get("skipped"):
        return f'<p class="muted">skipped: {_e(sec["skipped"])}</p>'
    rule = sec["rule"]
    out = (
        f"<p>Each identity is enrolled with the {_e(sec['aggregation'])} of n of its photos and verified against "
        f"another of its photos (genuine) and every other identity's (impostor); {sec['repeats']} seeded draws "
        f"(seed {sec['seed']}) over {sec['faces']} faces. TAR and FAR at the model's own rule "
        f"({_e(rule['metric'])} {'&lt;' if rule['accept_below'] else '&gt;'} {_num(rule['threshold'])}, not "
        "refitted per n). A model whose templates average well verifies better as n grows.</p>"
    )
    rows = [
        [
            str(p["n"]),
            _num(p["tar"]),
            _num(p["far"], 4),
            _num(p["auc"], 4),
            _num(p["genuine_score_mean"]),
            _num(p["impostor_score_mean"]),
            str(p["identities"]),
            str(p["n_genuine"]),
        ]
        for p in sec["curve"]
    ]
    out += _table(["n", "TAR", "FAR", "AUC", "genuine score", "impostor score", "identities", "genuine pairs"], rows)
    if sec.get("centroids_grid"):
        out += _trust(r) + (
            f"<p>Top: one photo's template decoded; bottom: the identity's centroid (mean of all its photos) "
            f"decoded by {_ref(sec.get('decoder'))}. Identities: "
            + _e(", ".join(f"{c['identity']} ({c['faces']})" for c in sec["centroids"]))
            + "</p>"
        )
        out += _img(sec["centroids_grid"], "single-photo decodings above decoded identity centroids", "wide")
    return out


def _privacy(r: dict[str, Any]) -> str:
    sec = r["privacy"]
    if sec.get("skipped"):
        return f'<p class="muted">{_e(sec["label"])}: skipped: {_e(sec["skipped"])}</p>'
    p, v, c, dec = sec["probe"], sec["verification"], sec["cosine_to_original"], sec["decoded"]
    rule = sec["rule"]
    out = (
        f"<p>Modification: {_e(sec['method'])}; label <b>{_e(sec['label'])}</b> ({sec['positives']} of "
        f"{sec['faces']} faces positive, {sec['identities']} identities, seed {sec['seed']}). A modified template "
        f"keeps cosine {_num(c['mean'])} (lowest {_num(c['min'])}) to its original.</p>"
    )
    out += (
        "<p><b>What is suppressed.</b> Held-out linear probe (identities split in two seeded halves; AUC of its "
        "predictions against the label, 0.5 = not readable):</p>"
    )
    out += _table(
        ["probe", "R²", "AUC"],
        [
            ["fitted and scored on the original templates", _num(p["r2_before"]), _num(p.get("auc_before"))],
            [
                "fitted on the originals, scored on the modified templates",
                _num(p["r2_fixed_probe_after"]),
                _num(p.get("auc_fixed_probe_after")),
            ],
            [
                "refitted and scored on the modified templates",
                _num(p["r2_refit_after"]),
                _num(p.get("auc_refit_after")),
            ],
        ],
    )
    if dec.get("skipped"):
        out += f'<p class="muted">decoder path skipped: {_e(dec["skipped"])}</p>'
    else:
        out += (
            f"<p>Through the decoder: {_e(dec['attribute'])} estimated on the decoded face separates the labelled "
            f"faces with AUC {_num(dec['auc_before'])} before and {_num(dec['auc_after'])} after (0.5 = not "
            f"readable); mean estimate {_num(dec['mean_before'])} → {_num(dec['mean_after'])}, mean change "
            f"{_num(dec['mean_abs_change'])}.</p>"
        )
    out += (
        f"<p><b>What verification keeps</b> (every pair of these faces, rule {_e(rule['metric'])} "
        f"{'&lt;' if rule['accept_below'] else '&gt;'} {_num(rule['threshold'])}):</p>"
    )
    out += _table(
        ["templates", "TAR", "FAR", "AUC", "genuine pairs", "impostor pairs"],
        [
            [
                side,
                _num(x["tar"]),
                _num(x["far"], 4),
                _num(x["auc"], 4),
                str(x["genuine_pairs"]),
                str(x["impostor_pairs"]),
            ]
            for side, x in (("original", v["before"]), ("modified", v["after"]))
        ],
    )
    if sec.get("grid"):
        out += _trust(r) + "<p>Top: decoded original templates; bottom: decoded modified templates.</p>"
        out += _img(sec["grid"], "decoded original above decoded modified templates", "wide")
    return out


TITLES = {
    "models": "Models",
    "reconstructions": "Reconstructions",
    "ssi": "SSI directions (eyes, nose, lower face)",
    "labels": "Label directions",
    "importance": "Attribute importance",
    "mirror": "Mirror invariance: what a template cannot keep",
    "counterfactuals": "Counterfactual explanations",
    "occlusion": "Occlusion: what the template keeps, what the decoder fills in",
    "aggregation": "Aggregation: verification against the number of templates per identity",
    "privacy": "Privacy: validating a template modification",
}
RENDER = {
    "models": _models,
    "reconstructions": _reconstructions,
    "ssi": _ssi,
    "labels": _labels,
    "importance": _importance,
    "mirror": _mirror,
    "counterfactuals": _counterfactuals,
    "occlusion": _occlusion,
    "aggregation": _aggregation,
    "privacy": _privacy,
}
CSS = """
body{font-family:sans-serif;margin:2em auto;max-width:1180px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#eee}
table.compact{font-size:.8em}.muted{color:#777}
.warn{background:#fff3cd;border:1px solid #d9a400;padding:.4em .8em}
img.wide{max-width:100%}img.strip{max-width:100%;height:auto}img.face{width:128px;height:128px}img.thumb{width:64px;height:64px}
figure{display:inline-block;margin:4px}figcaption{font-size:.8em;color:#555}
section{border-top:2px solid #444;margin-top:2em}code{background:#f4f4f4}
"""


def render_html(result: dict[str, Any]) -> str:
    a = result["audit"]
    d = result["data"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>facexplain audit: {_e(a['fr_model'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>facexplain audit: {_e(a['fr_model'])}</h1>",
        f"<p>Data <b>{_e(d['name'])}</b>: {d['n_images']} images of {d['n_identities']} identities "
        f"(manifest sha256 <code>{_e(d['manifest_sha256'][:16])}</code>), {len(d['audited'])} audited; labels: "
        f"{_e(', '.join(d['labels']) or 'none')}. Seed {a['seed']}. Started {_e(a.get('started', ''))}, "
        f'finished {_e(a.get("finished", ""))}. Every number is in <a href="audit.json">audit.json</a>.</p>',
        "<ol>" + "".join(f'<li><a href="#{k}">{_e(TITLES[k])}</a></li>' for k in SECTIONS if k in result) + "</ol>",
    ]
    for key in SECTIONS:
        if key not in result:
            continue
        parts.append(f'<section id="{key}"><h2>{_e(TITLES[key])}</h2>{_duration(result[key])}')
        parts.append(RENDER[key](result))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(result: dict[str, Any], out: Path | str) -> tuple[Path, Path]:
    """audit.json and index.html in ``out``; returns their paths."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    js = root / "audit.json"
    js.write_text(json.dumps(result, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n")
    page = root / "index.html"
    page.write_text(render_html(result), encoding="utf-8")
    return js, page
