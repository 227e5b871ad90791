"""Datasets in the VOC2012 layout (voc), the embedded synthetic one (synth), pair sampling, transforms."""
