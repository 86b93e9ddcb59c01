"""Datasets: locating sources, parsing the supported formats into conversations, and preparing training samples."""
