"""Losses shared by several methods (contrastive, ...), as pure functions."""
