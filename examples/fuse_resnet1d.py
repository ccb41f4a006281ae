"""fusedres.fuse() on a stock 1-D ResNet: same outputs, fewer ops, trainable."""
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

import fusedres


class StockBlock(gluon.HybridBlock):
    """A stock residual block as users write it (gluon-cv BasicBlockV1 style, 1-D)."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv1 = nn.Conv1D(channels, 3, padding=1, use_bias=False)
            self.bn1 = nn.BatchNorm()
            self.relu1 = nn.Activation("relu")
            self.conv2 = nn.Conv1D(channels, 3, padding=1, use_bias=False)
            self.bn2 = nn.BatchNorm()

    def hybrid_forward(self, F, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return F.relu(y + x)


def stock_resnet1d(channels=16):
    net = nn.HybridSequential()
    net.add(nn.Conv1D(channels, 7, padding=3), nn.BatchNorm(), nn.Activation("relu"),
            StockBlock(channels), StockBlock(channels), nn.Flatten(), nn.Dense(3))
    return net


def main():
    x = mx.nd.random.normal(shape=(8, 3, 50))
    net = stock_resnet1d()
    net.initialize(mx.init.Xavier())
    with autograd.record():  # one training step so the running statistics are not trivial
        net(x)
    before = net(x).asnumpy()
    report = fusedres.fuse(net, sample=x)
    print(report)
    after = net(x).asnumpy()
    print("max |fused - stock| in inference:", float(np.abs(after - before).max()))
    assert np.allclose(after, before, rtol=1e-4, atol=1e-5)
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with autograd.record():
        loss = net(x).square().mean()
    loss.backward()
    trainer.step(x.shape[0])
    print("trained one step after fusing; loss", loss.asscalar())
    return report


if __name__ == "__main__":
    main()
