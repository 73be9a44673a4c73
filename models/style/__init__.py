"""Neural style transfer: the seed's cost on a MobileNetV2 loss network, an optimiser mode (Gatys et al.) and a
feed-forward engine (Johnson et al.) exported to ONNX for the edge.

Modules that need torch (lossnet, cost, optimize, transformer, train, export, visualize) import it at their top
and are themselves imported lazily; `runtime` and `procedural` are numpy-only so the edge can use them without
torch.
"""
