"""Evaluation: the FID InceptionV3, streaming statistics, Frechet distance, IS, P/R."""
