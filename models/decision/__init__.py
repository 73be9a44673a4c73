"""Open-set decisions on embeddings: rules, calibration to a stranger rate, DIR-vs-FPIR curves."""
