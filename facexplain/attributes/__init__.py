"""Attribute estimators that read face *images* (aligned chips or decoded faces), never FR templates.

They are the independent measures for template-space methods: a direction or a recovered attribute is
checked by decoding templates and measuring the decoded pixels with models that had no part in it.

* :mod:`~facexplain.attributes.expression`: face-api's 7-class expression net (P(happy) for smiles);
* :mod:`~facexplain.attributes.pose`: head pose from the landmark net's 68 points (yaw for turning);
* :mod:`~facexplain.attributes.probe`: small pixel classifiers for binary CelebA labels (Eyeglasses, ...);
* :mod:`~facexplain.attributes.crops`: the face crops and input ranges they share.
"""
