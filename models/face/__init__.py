"""The face recognition pipeline: detector, alignment (and dlib's shape predictor), the encoders (dlib's ResNet, the
MobileFaceNet option) and their converters to ONNX, quality figures, fingerprint, engines."""
