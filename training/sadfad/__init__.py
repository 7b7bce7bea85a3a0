"""Interpretable FR training with the spatial / feature activation diversity losses (Yin et al.):
``facexplain train sadfad`` (see ``training.sadfad.run``).

Registration as a served embedder is not done here yet. ``facexplain.artifacts.bundle.load_bundle``
builds the ``recognition`` component as a ``FaceRecognitionNet`` whatever the bundle says, so a
bundle holding a SAD/FAD net would not load (and ``save_embedder_bundle`` records the golden template
by loading what it wrote). What the loader needs: for a ``recognition`` component with
``format == "torch"`` and ``arch == "sadfad_casia"``, build
``SADFADEmbedder(SADFADNet(SADFADConfig.from_dict(spec["config"])))`` and load ``spec["file"]`` into it
strictly; and ``save_embedder_bundle(weights="torch")`` should take a component's ``arch`` from the
module's ``arch`` attribute and store ``module.bundle_config()`` as the component's ``config`` when
the module has one (``SADFADEmbedder`` provides both). Everything else (detector, landmarks, dlib
alignment, the calibrated cosine threshold of ``OUT/model.pt``) fits the existing embedder bundle.
"""
