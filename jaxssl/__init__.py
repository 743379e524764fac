"""jaxssl: accelerator-native self-supervised pretraining in JAX/Flax."""

__version__ = '0.1.0'
