"""Flux-style skip connections in Gluon: IdentitySkip (add) and CatSkip (concat), with an
optional activation; add+relu is one fused op."""
import mxnet as mx
from mxnet.gluon import nn

import fusedres  # noqa: F401  (registers the ops)
from fusedres.nn import ConvBNReLU1D, SkipConnection


def main():
    x = mx.nd.random.normal(shape=(2, 8, 30))
    body = nn.HybridSequential()
    body.add(ConvBNReLU1D(8, 3, padding=1), ConvBNReLU1D(8, 3, padding=1))
    identity_skip = SkipConnection(body, mode="add", activation="relu")   # relu(body(x) + x)
    cat_skip = SkipConnection(ConvBNReLU1D(4, 3, padding=1), mode="concat", activation=None)
    for blk in (identity_skip, cat_skip):
        blk.initialize()
        blk.hybridize()
        print(blk, "->", blk(x).shape)
    assert identity_skip(x).shape == (2, 8, 30) and cat_skip(x).shape == (2, 12, 30)
    return identity_skip(x), cat_skip(x)


if __name__ == "__main__":
    main()
