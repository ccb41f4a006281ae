"""The seed question's RES_CNN1D, with fused blocks.

    Conv1D(10, 3, stride=2) -> BatchNorm -> relu -> Conv1D(10, 3) -> BatchNorm -> relu
    -> Conv1D(10, 3) -> BatchNorm -> (+ x) -> relu

The diagram adds the unstrided input to a stride-2 result: ResidualBlock1D adds the 1x1
strided projection shortcut that makes the shapes match (and says so if you forbid it).
"""
import mxnet as mx
from mxnet import autograd, gluon

import fusedres
from fusedres.nn import ResidualBlock1D


def main(steps=5, seed=0):
    mx.random.seed(seed)  # initial weights and data: the run is the same every time
    net = gluon.nn.HybridSequential()
    net.add(ResidualBlock1D(10, 3, strides=2, chain_length=3),
            gluon.nn.GlobalAvgPool1D(), gluon.nn.Dense(2))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    print(net)
    x = mx.nd.random.normal(shape=(16, 4, 64))
    label = (x.mean(axis=(1, 2)) > 0).astype("float32")
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(steps):
        with autograd.record():
            loss = loss_fn(net(x), label)
        loss.backward()
        trainer.step(x.shape[0])
        print(f"step {step}: loss {loss.mean().asscalar():.4f}")
    try:
        ResidualBlock1D(10, 3, strides=2, projection=False)
    except ValueError as err:
        print("projection=False with a stride-2 body is refused:", err)
    return loss.mean().asscalar()


if __name__ == "__main__":
    assert fusedres.__version__
    main()
