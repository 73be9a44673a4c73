"""The pure-Python dlib reader: primitive encodings on hand-built bytes, then the real face-encoder file."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dlib_bytes import pack_float, pack_int, pack_string

from models import registry
from models.errors import ModelFormatError
from models.face.dlib_format import (
    AddPrev,
    Affine,
    AvgPool,
    Con,
    DlibNetwork,
    Fc,
    MaxPool,
    Reader,
    Relu,
    Skip,
    Tag,
    parse_dlib_network,
)
from models.face.dlib_onnx import convert_dlib_bytes

# ----------------------------------------------------------------------------------------------------------------
# Integers


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"\x01\x00", 0),
        (b"\x01\x05", 5),
        (b"\x01\xff", 255),
        (b"\x02\x80\x12", 4736),  # the first con's params count
        (b"\x81\x1c", -28),  # the exponent of 0.04
        (b"\x82\x00\x01", -256),
        (b"\x08" + b"\xff" * 7 + b"\x7f", 2**63 - 1),
    ],
)
def test_int_decodes_hand_built_bytes(raw: bytes, value: int) -> None:
    r = Reader(raw)
    assert r.int() == value
    assert r.remaining == 0


@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, 255, 256, -4736, 65535, 2**31 - 1, -(2**40), 2**63 - 1])
def test_int_round_trips_dlib_encoding(value: int) -> None:
    assert Reader(pack_int(value)).int() == value


def test_int_reads_consecutive_values_and_tracks_offset() -> None:
    r = Reader(pack_int(150) + pack_int(-3) + pack_int(70000))
    assert [r.int(), r.int(), r.int()] == [150, -3, 70000]
    assert r.offset == 2 + 2 + 4


@pytest.mark.parametrize(
    ("raw", "offset"),
    [
        (b"", 0),  # no control byte
        (b"\x02\x80", 1),  # promises 2 bytes, has 1
        (b"\x01\x05\x04\x00\x00", 3),  # second integer truncated
    ],
)
def test_truncated_int_raises_with_offset(raw: bytes, offset: int) -> None:
    r = Reader(raw)
    with pytest.raises(ModelFormatError, match=f"at byte {offset}"):
        while True:
            r.int()


def test_int_wider_than_eight_bytes_is_rejected() -> None:
    with pytest.raises(ModelFormatError, match="control byte 0x09"):
        Reader(b"\x09" + b"\x00" * 9).int()


def test_unsigned_int_rejects_sign_bit() -> None:
    with pytest.raises(ModelFormatError, match="at byte 0"):
        Reader(b"\x81\x01").uint("a size")


# ----------------------------------------------------------------------------------------------------------------
# Strings, bools


def test_string_decodes() -> None:
    r = Reader(pack_string(b"con_4") + pack_string(b""))
    assert r.string() == b"con_4"
    assert r.string() == b""
    assert r.remaining == 0


def test_truncated_string_raises() -> None:
    # the length (5) is read; the error names where the missing text starts
    with pytest.raises(ModelFormatError, match=r"at byte 2: expected a layer name \(5 bytes, 3 left\)"):
        Reader(b"\x01\x05con").string("a layer name")


def test_ident_rejects_non_identifier_bytes() -> None:
    with pytest.raises(ModelFormatError, match="short identifier"):
        Reader(pack_string(b"\x01\x02")).ident("a layer name")


def test_bool_is_ascii_digit() -> None:
    r = Reader(b"10")
    assert r.bool() is True
    assert r.bool() is False
    with pytest.raises(ModelFormatError, match="'0' or '1'"):
        Reader(b"\x01").bool()


# ----------------------------------------------------------------------------------------------------------------
# Floats


def test_float_decodes_hand_built_margin() -> None:
    # the loss margin as dlib wrote it: mantissa 0xa3d70a, exponent -28
    value = Reader(b"\x03\x0a\xd7\xa3\x81\x1c").float()
    assert value == 0xA3D70A * 2.0**-28
    assert np.float32(value) == np.float32(0.04)


@pytest.mark.parametrize("value", [0.0, 1.0, -1.0, 0.5, 122.782, -117.001, 1e-30, 3.4e38, 0.6])
def test_float_round_trips_float32(value: float) -> None:
    f32 = float(np.float32(value))
    assert Reader(pack_float(f32)).float() == f32


def test_double_precision_mantissa_is_exact() -> None:
    assert Reader(pack_float(0.1, digits=53)).float() == 0.1


def test_float_special_exponents() -> None:
    assert Reader(pack_float(math.inf)).float() == math.inf
    assert Reader(pack_float(-math.inf)).float() == -math.inf
    assert math.isnan(Reader(pack_float(math.nan)).float())


def test_truncated_float_raises() -> None:
    raw = pack_float(0.04)
    with pytest.raises(ModelFormatError, match="exponent"):
        Reader(raw[:-1]).float("margin")
    with pytest.raises(ModelFormatError, match="mantissa"):
        Reader(raw[:2]).float("margin")


def test_legacy_ascii_float_is_refused() -> None:
    with pytest.raises(ModelFormatError, match="legacy ASCII"):
        Reader(b"0.04 ").float()


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def test_tensor_decodes_raw_little_endian_floats() -> None:
    values = np.arange(6, dtype="<f4")
    raw = pack_int(2) + b"".join(pack_int(d) for d in (1, 2, 3, 1)) + values.tobytes()
    tensor = Reader(raw).tensor("test")
    assert tensor.shape == (1, 2, 3, 1)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor.reshape(-1), values)


def test_truncated_tensor_raises() -> None:
    raw = pack_int(2) + b"".join(pack_int(d) for d in (1, 1, 1, 4)) + b"\x00" * 15
    with pytest.raises(ModelFormatError, match="4 float32 values"):
        Reader(raw).tensor("test")


def test_tensor_with_wrong_version_raises() -> None:
    with pytest.raises(ModelFormatError, match=r"version in \(2,\), found 1"):
        Reader(pack_int(1) + pack_int(0) * 4).tensor("test")


# ----------------------------------------------------------------------------------------------------------------
# The real file


@pytest.fixture(scope="module")
def source() -> bytes:
    return registry.read_verified(registry.DLIB_ENCODER)  # verifies the pinned sha256


@pytest.fixture(scope="module")
def net(source: bytes) -> DlibNetwork:
    return parse_dlib_network(source)


def test_layer_counts(net: DlibNetwork) -> None:
    assert net.count(Con) == 29
    assert net.count(Affine) == 29
    assert net.count(Relu) == 29
    assert net.count(AddPrev) == 14
    assert net.count(AvgPool) == 5
    assert net.count(MaxPool) == 1
    assert net.count(Fc) == 1
    # 14 residual blocks each tag their input; the 4 downsampling ones also tag the block output and skip back
    assert net.count(Tag) == 18
    assert net.count(Skip) == 4


def test_loss_and_input(net: DlibNetwork) -> None:
    assert np.float32(net.loss.margin) == np.float32(0.04)
    assert np.float32(net.loss.distance_threshold) == np.float32(0.6)
    means = np.array(net.input.mean_rgb, dtype=np.float32)
    np.testing.assert_array_equal(means, np.array([122.782, 117.001, 104.298], dtype=np.float32))
    assert (net.input.rows, net.input.cols) == (150, 150)


def test_stem(net: DlibNetwork) -> None:
    con, affine, relu, pool = net.layers[:4]
    assert isinstance(con, Con)
    assert con.param_count == 4736
    assert con.weights.shape == (32, 3, 7, 7)
    assert con.biases.shape == (32,)
    assert (con.stride_y, con.stride_x, con.padding_y, con.padding_x) == (2, 2, 0, 0)
    assert isinstance(affine, Affine)
    assert affine.mode == "conv"
    assert affine.gamma.shape == affine.beta.shape == (32,)
    assert isinstance(relu, Relu)
    assert pool == MaxPool(rows=3, cols=3, stride_y=2, stride_x=2, padding_y=0, padding_x=0)


def test_head(net: DlibNetwork) -> None:
    *_, pool_all, fc = net.layers
    assert pool_all == AvgPool(rows=0, cols=0, stride_y=1, stride_x=1, padding_y=0, padding_x=0)
    assert isinstance(fc, Fc)
    assert (fc.num_inputs, fc.num_outputs) == (256, 128)
    assert fc.weights.shape == (256, 128)
    assert fc.biases is None  # fc_no_bias


def test_padding_follows_dlib_default(net: DlibNetwork) -> None:
    # dlib's default: no padding for strided convolutions, size/2 otherwise
    for layer in net.layers:
        if isinstance(layer, Con):
            expected = 0 if layer.stride_y != 1 else layer.rows // 2
            assert (layer.padding_y, layer.padding_x) == (expected, expected)


def test_residual_down_markers(net: DlibNetwork) -> None:
    layers = net.layers
    skips = [i for i, layer in enumerate(layers) if isinstance(layer, Skip)]
    for i in skips:
        assert layers[i - 1] == Tag(2)
        assert layers[i] == Skip(1)
        assert isinstance(layers[i + 1], AvgPool)
        assert layers[i + 2] == AddPrev(2)


def test_weights_are_finite(net: DlibNetwork) -> None:
    for layer in net.layers:
        for array in (getattr(layer, name, None) for name in ("weights", "biases", "gamma", "beta")):
            if array is not None:
                assert np.isfinite(array).all()


@pytest.mark.parametrize("fraction", [0.0, 0.00001, 0.001, 0.5, 0.999999])
def test_truncated_file_raises(source: bytes, fraction: float) -> None:
    cut = int(len(source) * fraction)
    with pytest.raises(ModelFormatError, match=r"at byte \d+: expected"):
        parse_dlib_network(source[:cut])


def test_truncated_by_one_byte_raises(source: bytes) -> None:
    with pytest.raises(ModelFormatError, match="at byte"):
        parse_dlib_network(source[:-1])


def test_trailing_bytes_raise(source: bytes) -> None:
    with pytest.raises(ModelFormatError, match="end of the file"):
        parse_dlib_network(source + b"\x00")


def test_unknown_layer_raises(source: bytes) -> None:
    corrupt = source.replace(b"\x05con_4", b"\x05con_9", 1)
    with pytest.raises(ModelFormatError, match="'con_9'"):
        parse_dlib_network(corrupt)


def test_non_dlib_bytes_raise() -> None:
    with pytest.raises(ModelFormatError):
        parse_dlib_network(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def test_conversion_is_deterministic(source: bytes) -> None:
    first = convert_dlib_bytes(source)
    second = convert_dlib_bytes(source)
    assert first == second


def test_converted_graph_interface(source: bytes) -> None:
    import onnx

    model = onnx.load_from_string(convert_dlib_bytes(source))
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (chip,) = model.graph.input
    (embedding,) = model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (chip.name, dims(chip)) == ("chip", ["N", 3, 150, 150])
    assert (embedding.name, dims(embedding)) == ("embedding", ["N", 128])
