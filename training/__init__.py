"""nextact's offline side: event log -> vocabulary -> windows -> LSTM/GRU -> metrics -> model.onnx + manifest.json.

Command line: ``python -m training train|evaluate --help``. Python API (imports torch)::

    from training.predict import predict
    probabilities = predict("artifacts/demo", [["pv", "cart"], []])  # (2, V): what model.onnx computes

Importing this package imports nothing heavy; torch is loaded by the modules that need it.
"""
