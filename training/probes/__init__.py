"""Accessory/appearance probes (issue 6): ``facexplain train probes`` (see ``training.probes.run``).

Linear probes for CelebA labels on frozen face-api features, registered as ``attribute_probes``
bundles under ``facexplain-probes-faceapi``; the estimator itself lives in
``facexplain.attributes.accessory`` so services load it without this package.
"""
