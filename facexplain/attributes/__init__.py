"""Attributes of face *images* (aligned chips or decoded faces), never of templates, and what a template keeps.

They are the independent measures for template-space methods: a direction or a recovered attribute is
checked by decoding templates and measuring the decoded pixels with models that had no part in it.

* :mod:`~facexplain.attributes.catalog`: the attribute catalogue (specs, the estimator protocol);
  :mod:`~facexplain.attributes.defaults` assembles the default one;
* estimators: :mod:`~facexplain.attributes.geometry` (landmark ratios), :mod:`~facexplain.attributes.pose`
  (head pose from the 68 landmarks), :mod:`~facexplain.attributes.colour` (colour moments of skin, hair,
  iris), :mod:`~facexplain.attributes.face_nets` (face-api's age/gender and expression nets),
  :mod:`~facexplain.attributes.accessory` (linear probes for CelebA labels on frozen face-api features),
  :mod:`~facexplain.attributes.texture` (LBP histograms on a 7x7 grid),
  :mod:`~facexplain.attributes.probe` (small pixel classifiers, used by the direction benchmarks);
* :mod:`~facexplain.attributes.recovery`: estimate on originals and on decoded faces (Ren et al.'s two stages);
* :mod:`~facexplain.attributes.importance`: I(a; â) per attribute, its interval and a shuffled control;
* :mod:`~facexplain.attributes.crops`: the face crops and input ranges the nets share.
"""
