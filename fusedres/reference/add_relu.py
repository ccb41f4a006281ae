import numpy as np


def add_relu_forward(a, b):
    """y = max(a + b, 0)."""
    return np.maximum(a + b, 0)


def add_relu_backward(dy, y):
    """Gradients of add_relu w.r.t. both inputs (they are equal): dy where y > 0."""
    g = np.where(y > 0, dy, 0).astype(dy.dtype)
    return g, g.copy()
