"""serve: the student as a servable file.

    module.py    ServingModel: a distkd model as plain torch (EmbeddingBags, transforms inside, int8)
    contract.py  the input contract (contract.json) a caller follows
    export.py    `distkd export`: TorchScript, torch.export, ONNX files, each checked after writing
    latency.py   p50/p99 per call on one thread, models measured side by side
    figures.py   the evaluation report's serving section (sizes, latency, int8 AUC cost)
"""
