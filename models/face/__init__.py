"""The face recognition pipeline: detector, alignment (and dlib's shape predictor), encoder (dlib's ResNet converted to
ONNX), quality figures, fingerprint, engines."""
