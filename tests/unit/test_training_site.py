"""The site workflows end to end on synthetic people: adapter trained, judged on held-out people, shipped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from training_data import FINGERPRINT, clusters, image_folder

from models.errors import AdapterRejectedError, DatasetError
from models.training.adapter import EmbeddingAdapter, ship_adapter
from models.training.site_adapter import AdapterConfig, train_site_adapter
from models.training.site_verifier import compare_verifiers
from models.training.trainer import TrainConfig

CONFIG = AdapterConfig(pairs=100, train=TrainConfig(epochs=40, lr=1e-2, p=6, k=4, regularisation=1e-3, seed=5))


def test_a_helpful_adapter_is_trained_judged_and_shipped(tmp_path) -> None:
    data = clusters(24, 6, seed=31)
    root = image_folder(tmp_path / "faces", data)
    outcome = train_site_adapter(data, root, CONFIG, checkpoint_dir=tmp_path / "ckpt", progress=False)
    split = outcome.split
    assert not (set(split.train) & set(split.test)) and not (set(split.val) & set(split.test))
    assert set(outcome.test_before.identities) == set(split.test)
    assert outcome.training.best_epoch > 0
    v = outcome.verdict
    assert v.ship and not v.worse, v.reason()
    assert outcome.after.reference.verif_acc > outcome.before.reference.verif_acc
    ship_adapter(tmp_path / "out", outcome.onnx, outcome.manifest, v)
    with EmbeddingAdapter.load(tmp_path / "out", base_fingerprint=FINGERPRINT) as adapter:
        np.testing.assert_allclose(adapter.apply(outcome.test_before.vectors), outcome.test_after.vectors, atol=1e-6)
        assert adapter.fingerprint == outcome.test_after.fingerprint != FINGERPRINT


def test_nothing_to_learn_means_no_adapter(tmp_path) -> None:
    # isotropic, well-separated clusters: the encoder space is already right; validation never improves on the
    # untrained identity map, which early stopping keeps, and an adapter that changes nothing is refused
    data = clusters(24, 5, informative=8, spread=0.1, seed=32)
    root = image_folder(tmp_path / "faces", data)
    outcome = train_site_adapter(data, root, CONFIG, progress=False)
    assert outcome.training.best_epoch == 0 and outcome.training.stopped_early
    assert not outcome.verdict.ship and not outcome.verdict.better
    with pytest.raises(AdapterRejectedError, match="improves no figure"):
        ship_adapter(tmp_path / "out", outcome.onnx, outcome.manifest, outcome.verdict)
    assert not (tmp_path / "out").exists()


def test_too_few_people_to_hold_any_out(tmp_path) -> None:
    data = clusters(3, 4, seed=33)
    root = image_folder(tmp_path / "faces", data)
    with pytest.raises(DatasetError, match="too few identities"):
        train_site_adapter(data, root, CONFIG, progress=False)
    with pytest.raises(DatasetError, match="too few identities"):
        train_site_adapter(data, root, dataclasses.replace(CONFIG, val_fraction=0.0), progress=False)


def test_verifier_comparison_on_held_out_people(tmp_path) -> None:
    data = clusters(24, 6, seed=34)
    root = image_folder(tmp_path / "faces", data)
    cmp = compare_verifiers(data, root, target_far=1e-2, pairs=100)
    assert set(cmp.candidates) == {"abs", "chi2"}
    for form, c in cmp.candidates.items():
        assert c.manifest.form == form and c.manifest.base_fingerprint == FINGERPRINT
        assert c.manifest.threshold == c.calibration.rule.threshold and c.calibration.point.fpir <= 1e-2
        # nuisance-dominated distances: the learned weighting wins on people it never saw
        assert c.report.reference.verif_acc > cmp.baseline.reference.verif_acc


def test_train_adapter_config_file_is_strict_and_flags_override(tmp_path) -> None:
    from models.cli.model_tool import build_parser
    from models.cli.train_commands import _adapter_config
    from models.errors import ConfigError

    cfg = tmp_path / "adapter.yaml"
    cfg.write_text("head: mlp\nhidden: 32\ntrain:\n  mining: semi-hard\n  alpha: 0.3\n  epochs: 50\n")
    parser = build_parser()
    args = parser.parse_args(["train-adapter", "faces", "--out", "o", "--config", str(cfg), "--alpha", "0.25"])
    config = _adapter_config(args)
    assert (config.head, config.hidden, config.train.mining, config.train.epochs) == ("mlp", 32, "semi-hard", 50)
    assert config.train.alpha == 0.25  # the flag wins over the file
    assert config.test_fraction == AdapterConfig().test_fraction  # neither sets it: the default
    cfg.write_text("train:\n  alpah: 0.3\n")
    with pytest.raises(ConfigError, match=r"train\.alpah: unknown key"):
        _adapter_config(parser.parse_args(["train-adapter", "faces", "--out", "o", "--config", str(cfg)]))
    with pytest.raises(ConfigError, match="alpha"):
        _adapter_config(parser.parse_args(["train-adapter", "faces", "--out", "o", "--alpha", "-1"]))
