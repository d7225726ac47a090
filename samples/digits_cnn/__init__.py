"""A small CNN trained on scikit-learn's 8x8 handwritten digits."""
