"""Receptive fields (by hand, ONNX graph walk vs torch, and the true gradient support), honest patch crops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.style.lossnet import MobileNetV2
from models.style.visualize import ReceptiveField, UnitPatches, crop, onnx_fields, render, top_patches, torch_field


def test_receptive_field_composition_by_hand():
    rf = ReceptiveField().then(3, 1, 1).then(3, 2, 0)
    # 3x3 stride 1 pad 1: size 3, jump 1, start 0; then 3x3 stride 2 no pad: size 3 + 2 = 5, jump 2, start 0 + 1
    assert rf == ReceptiveField(5, 2, 1.0)
    assert rf.box(0, 0) == (-1, -1, 4, 4) and rf.box(2, 1) == (3, 1, 8, 6)
    assert ReceptiveField().then(3, 1, 0, dilation=2) == ReceptiveField(5, 1, 2.0)


def test_crop_pads_outside_with_grey():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    out = crop(img, (-1, 2, 2, 5))
    assert out.shape == (3, 3, 3)
    assert (out[0] == 128).all() and (out[:, 2] == 128).all()
    assert np.array_equal(out[1:, :2], img[0:2, 2:4])


def _tiny_graph() -> onnx.ModelProto:
    """x -> conv 3x3 s1 p1 -> relu -> maxpool 2 s2 -> conv 3x3 s2 p1 (+ a 1x1 shortcut added back) -> relu."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w2")
    w3 = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w3")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w3"], ["s"], kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Add", ["s", "c2"], ["a"]),
        helper.make_node("Relu", ["a"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w, w2, w3],
    )
    return helper.make_model(graph)


def test_onnx_walk_matches_torch_walk_on_the_same_network():
    fields = onnx_fields(_tiny_graph())
    net = nn.Sequential(nn.Conv2d(1, 2, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(2, 2, 3, 2, 1))
    assert fields["r1"] == torch_field(net, "1") == ReceptiveField(3, 1, 0.0)
    assert fields["p1"] == torch_field(net, "2") == ReceptiveField(4, 2, 0.5)
    assert fields["out"] == torch_field(net, "3") == ReceptiveField(8, 4, 0.5)  # the Add takes the 3x3 path


def test_mobilenet_field_is_the_true_gradient_support():
    """With small positive weights (no ReLU6 saturation, no dead units) d unit / d input is non-zero exactly on
    the receptive field, so the walk's box must be the gradient's bounding box."""
    net = MobileNetV2().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.01)
    layer = "features.4.conv.0"
    rf = torch_field(net, layer)
    assert (rf.size, rf.jump) == (19, 4)
    acts = {}
    dict(net.named_modules())[layer].register_forward_hook(lambda _m, _i, o: acts.setdefault("a", o))
    x = torch.ones(1, 3, 64, 64, requires_grad=True)
    net.features[:5](x)
    i, j = 7, 9
    acts["a"][0, 0, i, j].backward()
    ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy())
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == rf.box(i, j)


class _FakeProbe:
    field = ReceptiveField(3, 1, 0.0)
    ranked_before_clamp = False

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        act = np.zeros((2, 8, 8), np.float32)
        act[0, 4, 5] = image[0, 0, 0]  # unit 0 peaks where the image says, as strong as its first pixel
        act[1, 0, 0] = 100  # unit 1 peaks at the border, which is ignored
        act[1, 3, 3] = image[0, 0, 1]
        return image, act


def test_top_patches_ranks_images_and_crops_the_field():
    images = [(f"img{v}", np.full((8, 8, 3), v, np.uint8)) for v in (10, 50, 30)]
    for name, img in images:
        img[0, 0, 1] = 200 - int(name[3:])
    found = top_patches(_FakeProbe(), iter(images), units=5, per_unit=2)
    assert [u.unit for u in found] == [0, 1]  # only two units exist
    assert found[0].sources == ("img50", "img30") and found[0].activations == (50.0, 30.0)
    assert found[1].sources == ("img10", "img30")  # the border peak of 100 was skipped
    assert found[0].patches[0].shape == (3, 3, 3) and (found[0].patches[0] == 50).all()
    picture = render([UnitPatches(0, (1.0,), ("a",), (np.zeros((3, 3, 3), np.uint8),))], "title")
    assert picture.ndim == 3 and picture.dtype == np.uint8


@pytest.mark.parametrize("layer", ["features.0", "features.7.conv.0", "features.11.conv.0"])
def test_style_layers_fields(layer: str):
    rf = torch_field(MobileNetV2(), layer)
    assert {"features.0": (3, 2), "features.7.conv.0": (59, 8), "features.11.conv.0": (171, 16)}[layer] == (
        rf.size,
        rf.jump,
    )
