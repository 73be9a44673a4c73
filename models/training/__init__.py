"""Learning from a site's own faces: triplet-loss training, the siamese verifier, threshold calibration.

Modules (torch is imported only by ``losses``, ``mining``, ``heads``, ``trainer`` and ``site_adapter``, which uses
them; everything that runs at the edge or on the server, i.e. applying an adapter or a verifier, goes through ONNX
and ``models.backends``):

- ``dataset``: folder-per-identity datasets as labelled embeddings (cached), person-disjoint splits;
- ``losses`` / ``mining`` / ``sampler`` / ``trainer``: the triplet loss with batch-hard and semi-hard online mining
  over P identities x K images batches, and a deterministic training loop with checkpoints and early stopping;
- ``heads``: the adapter networks (linear, residual 2-layer) on the frozen encoder, initialised to identity;
- ``export``: ONNX graphs for the adapter and the verifier, built from their weights;
- ``adapter``: the adapter artefact at run time, its fingerprint, and the rule that refuses a harmful adapter;
- ``site_adapter``: train, evaluate before / after on held-out people, ship or refuse;
- ``verifier``: the siamese binary verifier (|difference| and chi-square forms), fitted by logistic regression;
- ``calibration``: distance (and margin / ratio) thresholds for a target false accept rate with bootstrap
  intervals, written as a decision-rule YAML fragment;
- ``plots``: distance histograms for a person to look at.
"""
