"""Evaluation: frozen-feature probes (linear, kNN, few-shot, attentive), reconstruction pictures, and the
`python -m jaxssl.evaluate --workdir=...` command that runs a method's evaluation on a checkpoint."""
