"""`loraengine monitor RUN_DIR`: a live local web page of a training run."""
